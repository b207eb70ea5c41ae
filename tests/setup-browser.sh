#!/usr/bin/env bash
# The browser of tests/test_demo_browser.py: Debian's chromium package, installed with apt-get only
# when no chromium is on PATH (Playwright, which drives it, comes from the dev extra: no browser
# download). Safe to run again; the README's test command and .ci/run call it.
# DMGAN_NO_BROWSER=1 installs nothing (the browser test then skips, except under CI=true).
set -euo pipefail

say() { echo "tests/setup-browser.sh: $*" >&2; }

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ -n "${DMGAN_NO_BROWSER:-}" ]; then
    say "no chromium on PATH and DMGAN_NO_BROWSER is set: installing none (the browser test skips)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "no chromium on PATH and no apt-get to install Debian's chromium package: install a chromium" \
        "(or set DMGAN_NO_BROWSER=1 to skip the browser test)"
    exit 1
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        say "no chromium on PATH, and installing Debian's chromium package needs root:" \
            "run 'sudo apt-get install chromium' (or set DMGAN_NO_BROWSER=1 to skip the browser test)"
        exit 1
    fi
fi
say "installing Debian's chromium package (apt-get)"
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get update -qq &&
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
    say "apt-get could not install chromium (see above)"
    exit 1
fi
command -v chromium >/dev/null 2>&1 || { say "apt-get ran, yet no chromium is on PATH"; exit 1; }
say "$(chromium --version 2>/dev/null || echo chromium) installed"
