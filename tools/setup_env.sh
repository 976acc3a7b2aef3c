#!/usr/bin/env bash
# Install mmfisher and its OpenMMLab stack into the current Python environment.
#
# Idempotent: every step is skipped when what it installs is already there, so
# running it again costs a few seconds.
#
# Order matters (see README "Set-up"):
#   1. torch==2.13.0 alone, and only when no torch is installed (GPU users keep theirs;
#      an unpinned `torch` would pull several GB of CUDA packages).
#   2. a setuptools that still ships pkg_resources (mmcv's setup.py needs it).
#   3. mmcv 2.1.0 with compiled ops: from a local wheelhouse when one exists
#      (MMFISHER_WHEELHOUSE, default ../shared/wheelhouse), else built from source
#      (about 25 minutes on 2 cores) with --no-build-isolation so it sees torch.
#   4. mmfisher itself (editable) with mmengine, mmdet, mmpretrain and test extras.
#   5. transformers and fairscale into .language_env/ (pip --target, not this environment): the
#      support matrix's GLIP and Grounding DINO rows put it on the path of their checks only.
#      With transformers importable, `import mmpretrain.models` imports torchvision, whose PyPI
#      wheel does not load beside this CPU torch.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python}"
pipi() { "$py" -m pip install --disable-pip-version-check "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0 (CPU wheel)"
    pipi "torch==2.13.0"
fi

if ! "$py" -c "import pkg_resources, setuptools, sys; v=tuple(int(x) for x in setuptools.__version__.split('.')[:2]); sys.exit(not ((77, 0) <= v < (82, 0)))" 2>/dev/null; then
    echo "[setup] installing setuptools>=77.0.3,<82 (keeps pkg_resources for mmcv)"
    pipi "setuptools>=77.0.3,<82" wheel
fi

wheelhouse="${MMFISHER_WHEELHOUSE:-$here/../shared/wheelhouse}"
find_links=()
if [ -d "$wheelhouse" ]; then
    find_links=(--find-links "$wheelhouse")
fi

if ! "$py" -c "import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != '2.1.0')" 2>/dev/null; then
    if [ ${#find_links[@]} -eq 0 ]; then
        echo "[setup] building mmcv 2.1.0 from source (about 25 minutes on 2 cores)"
    else
        echo "[setup] installing mmcv 2.1.0 (wheelhouse: $wheelhouse)"
    fi
    MMCV_WITH_OPS=1 pipi --no-build-isolation "${find_links[@]}" "mmcv==2.1.0"
fi

echo "[setup] installing mmfisher with mmengine, mmdet, mmpretrain"
pipi --no-build-isolation "${find_links[@]}" -e "$here[tests]"
lang="$here/.language_env"
if [ ! -f "$lang/.complete" ]; then
    echo "[setup] installing transformers and fairscale into $lang (GLIP / Grounding DINO checks only)"
    rm -rf "$lang"
    pipi -q --no-deps --target "$lang" transformers==4.38.2 tokenizers==0.15.2 safetensors==0.4.2 \
        huggingface_hub==0.20.3 regex==2026.12.2 fairscale==0.4.13
    touch "$lang/.complete"
fi

"$py" -c "import torch, mmcv, mmengine, mmdet, mmpretrain, mmfisher; print('[setup] ok: torch', torch.__version__, 'mmcv', mmcv.__version__, 'mmengine', mmengine.__version__, 'mmdet', mmdet.__version__, 'mmpretrain', mmpretrain.__version__)"
