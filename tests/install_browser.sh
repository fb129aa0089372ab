#!/usr/bin/env bash
# The headless browser of tests/test_label_browser.py: Debian's chromium package (the test launches it through
# playwright; playwright's own browser download is not used). Idempotent: does nothing when chromium is present.
# Installing needs root (as on CI and the development machines); otherwise it says what to run and the browser
# test skips.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "warning: chromium is missing, so the browser test will be skipped; install it as root:" \
        "apt-get update && apt-get install -y chromium" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null
