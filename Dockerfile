# dist_clm on a CUDA PyTorch image. Build and run (GPUs, a data directory mounted at /data):
#   docker build -t dist-clm .
#   docker run --gpus all --ipc=host -v $PWD/data:/data -v $PWD/runs:/runs dist-clm \
#       train --config configs/gpt2-124m.yaml data.path=/data/prepared run.dir=/runs/gpt2
# Multi-GPU in one container: --entrypoint deepspeed ... dist-clm --num_gpus 8 --module dist_clm train ...
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1

WORKDIR /opt/dist_clm
# the project's own dependency list (pyproject.toml) decides every version; torch comes from the base image
COPY pyproject.toml README.md ./
COPY dist_clm ./dist_clm
COPY configs ./configs
COPY launchers ./launchers
RUN python -m pip install --no-cache-dir .

# DeepSpeed JIT-compiles its CUDA ops on first use (nvcc and ninja are in the -devel image)
ENTRYPOINT ["dist-clm"]
CMD ["--help"]
