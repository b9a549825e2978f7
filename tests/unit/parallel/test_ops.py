"""Where DeepSpeed's compiled ops are built (parallel/ops.py): one folder per installation unless the user names
one, one line before a build, and no "built successfully" after every start."""

import contextlib
import io

from dist_clm.parallel import ops


def test_each_installation_builds_in_its_own_folder_unless_the_user_names_one(tmp_path):
    a = ops.op_home({}, "/checkout-a/.venv/lib/python3.11/site-packages/deepspeed")
    b = ops.op_home({}, "/checkout-b/.venv/lib/python3.11/site-packages/deepspeed")
    assert a != b and a.parent == b.parent and a.name.startswith("dist_clm-")
    assert a == ops.op_home({}, "/checkout-a/.venv/lib/python3.11/site-packages/deepspeed")  # stable
    assert ops.op_home({"TORCH_EXTENSIONS_DIR": str(tmp_path)}, "/checkout-a") == tmp_path
    assert ops.op_home({}).name.startswith("dist_clm-")  # this installation's


def test_a_build_is_announced_only_when_it_is_not_there(tmp_path):
    notice = ops.build_notice(tmp_path)
    assert notice and "once for this installation" in notice and str(tmp_path) in notice
    (tmp_path / ops.SHM_OP).mkdir()
    (tmp_path / ops.SHM_OP / "build.ninja").write_text("")  # a build that did not finish
    assert ops.build_notice(tmp_path)
    (tmp_path / ops.SHM_OP / f"{ops.SHM_OP}.so").write_bytes(b"\x7fELF")
    assert ops.build_notice(tmp_path) is None


def test_only_deepspeeds_build_report_is_dropped():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), ops.quiet_build_report():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something the user should see")
    assert out.getvalue() == "something the user should see\n"


def test_the_environments_own_ninja_builds_the_op_activated_or_not(tmp_path):
    """torch runs the `ninja` PATH finds; the system's 1.11 and the environment's 1.13 hash a build's command
    differently, so processes with and without the environment's bin on PATH rebuilt the op in turn (seen in a
    test run: every ~40 s for 15 minutes). The environment's bin goes first on PATH, once; without a ninja
    there, PATH is left alone."""
    from dist_clm.parallel.ops import environment_ninja_first

    env_bin = tmp_path / "venv" / "bin"
    env_bin.mkdir(parents=True)
    environ = {"PATH": "/usr/local/bin:/usr/bin"}
    environment_ninja_first(environ, env_bin)
    assert environ["PATH"] == "/usr/local/bin:/usr/bin"  # (no ninja in the environment)
    (env_bin / "ninja").write_text("")
    environment_ninja_first(environ, env_bin)
    assert environ["PATH"] == f"{env_bin}:/usr/local/bin:/usr/bin"
    environ["PATH"] = f"/usr/bin:{env_bin}"
    environment_ninja_first(environ, env_bin)
    environment_ninja_first(environ, env_bin)
    assert environ["PATH"] == f"{env_bin}:/usr/bin"
