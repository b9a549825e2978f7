"""Small fine-tuning datasets built on the spot (no download), for the README's examples, drills and tests:
`dist-clm data synthetic --task chat|prompt-completion --out FILE.jsonl`.

The task is arithmetic a model of a few hundred thousand parameters learns in minutes on a CPU: a system turn,
a user asking for a sum, the assistant answering with it (a third of the conversations go on with a second
question, the sum doubled). Records are JSON lines in the shapes `dist-clm prepare --format` reads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dist_clm.errors import UserError
from dist_clm.fsutil import atomic_write_text

TASKS = ("chat", "prompt-completion", "preference")
REFUSALS = ("I do not know.", "Ask someone else.", "Numbers are hard.", "No.")


def arithmetic(task: str, n: int, seed: int = 0) -> list[dict]:
    """`n` records of the arithmetic task in the shape of `task`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        question, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        if task == "prompt-completion":
            out.append({"prompt": f"Q: {question}\nA:", "completion": f" {answer}"})
            continue
        if task == "preference":  # the answer preferred to a refusal (learnable from the answers' form)
            user = [{"role": "user", "content": question}]
            out.append({"prompt": user, "chosen": [{"role": "assistant", "content": answer}],
                        "rejected": [{"role": "assistant", "content": rng.choice(REFUSALS)}]})  # fmt: skip
            continue
        messages = [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        if i % 3 == 0:
            messages += [
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": f"{2 * (a + b)}."},
            ]
        out.append({"messages": messages})
    return out


def write(task: str, out: str | Path, n: int = 2000, seed: int = 0) -> Path:
    if task not in TASKS:
        raise UserError(f"--task must be one of {', '.join(TASKS)}, got {task!r}.")
    if n < 1:
        raise UserError(f"--records must be at least 1, got {n}.")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in arithmetic(task, n, seed)))
    return path
