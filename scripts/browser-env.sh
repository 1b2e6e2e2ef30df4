#!/usr/bin/env bash
# Installs what the web console's browser test drives (tests/test_console.py): Debian's chromium and
# chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver), when missing. As root directly, else with
# sudo; quick when they are there already.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
SUDO=""
if [[ $(id -u) != 0 ]]; then SUDO="sudo"; fi
packages=(chromium chromium-driver)
$SUDO apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null 2>&1 ||
  { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; }
command -v chromium >/dev/null && command -v chromedriver >/dev/null
echo "browser-env: $(chromium --version 2>/dev/null | head -1)"
