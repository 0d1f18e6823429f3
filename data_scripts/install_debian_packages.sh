#!/usr/bin/env bash
# Installs the Debian packages that hold the offline Bible corpus (SWORD modules), and jemalloc,
# which `nmt train` runs on when it is there (see nmt/allocator.py), and g++, which builds
# lstm_ln's C++ kernel (`train.cell_kernels: native`, nmt/model/ln_kernel.py), when missing.
set -euo pipefail
packages=(sword-text-sparv sword-text-web libjemalloc2 g++)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  echo "Installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "The Bible corpus, jemalloc and the lstm_ln kernel need Debian packages that are not installed: ${missing[*]}" >&2
  echo "Install them with:  sudo apt-get install ${missing[*]}" >&2
  echo "(continuing: everything except data_scripts/bible.py and train.cell_kernels: native works without them)" >&2
fi
