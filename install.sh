#!/usr/bin/env bash
# Create .venv and install lisa_dist with its dependencies. torch comes first, pinned, so that no
# other requirement pulls a CUDA build; deepspeed builds against that torch (hence no build isolation).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test]"
# DeepSpeed JIT-builds a shared-memory comm op on its first CPU run; build it once here, since two ranks
# building it at the same time can crash.
if ! .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" 2>&1 | grep -i "built\|error" || true
fi
.venv/bin/python -c "import torch, deepspeed, transformers, accelerate; print('lisa_dist install ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" 2>&1 | grep "install ok"
