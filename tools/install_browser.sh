#!/usr/bin/env bash
# Debian's Chromium for the page's browser tests (tests/web): Playwright drives it through executable_path,
# because Playwright's own browser download cannot reach its host from our machines. Playwright itself (the
# Python package, its driver included) comes from pip with the dev extra. Idempotent: does nothing when
# chromium is already there. Needs root (or sudo) for apt-get.
set -euo pipefail
exe="${ADVISOR_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$exe" ]; then
    echo "install_browser: $exe present ($("$exe" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install_browser: $exe missing and not root (no sudo): install Debian's chromium" >&2; exit 1; }
    sudo="sudo"
fi
echo "install_browser: installing Debian's chromium (apt-get)"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
"$exe" --version
