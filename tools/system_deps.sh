#!/usr/bin/env bash
# Install the Debian packages the project needs, only those that are missing.
#   system_deps.sh        everything: the dataset, Chromium (the browser tests) and npm (KaTeX for the offline docs)
#   system_deps.sh demo   only what `make demo` needs: the Fashion-MNIST package
set -euo pipefail
pkgs=(dataset-fashion-mnist)
[ "${1:-all}" = demo ] || pkgs+=(chromium chromium-driver)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${1:-all}" != demo ]; then command -v npm >/dev/null 2>&1 || missing+=(nodejs npm); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi
