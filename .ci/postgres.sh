#!/usr/bin/env bash
# PostgreSQL for tests/test_tune.py's two-worker test, which starts a private cluster of its own: Debian's
# `postgresql` package, installed only when its programs are missing (on PATH or in Debian's folder).
set -euo pipefail
found() { command -v "$1" >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/$1" >/dev/null; }
if found initdb && found pg_ctl; then
  exit 0
fi
as_root=""; [ "$(id -u)" -eq 0 ] || as_root="sudo"
$as_root apt-get update -qq
$as_root apt-get install -y -qq --no-install-recommends postgresql
# Debian installs the server programs in /usr/lib/postgresql/<version>/bin, which is not on PATH; the
# test looks there. Its package also starts a cluster on port 5432 here and there: the test does not use it.
ls -d /usr/lib/postgresql/*/bin
