#!/usr/bin/env bash
# Bring the dashboard's npm packages into the Python package: `npm ci` installs exactly what
# vmquota/dashboard/npm/package-lock.json names, and npm checks each tarball against the lockfile's sha512
# integrity before unpacking it, so a changed or substituted package fails the build. Their built files are
# copied into vmquota/dashboard/static/vendor/ (committed), so that serving needs neither node nor a network.
#
# Run it after changing package.json (then `npm install --package-lock-only` in that folder first, and review
# the lockfile's diff). No install scripts run (--ignore-scripts): the packages are only copied, never executed.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NPM_DIR="$REPO_ROOT/vmquota/dashboard/npm"
VENDOR="$REPO_ROOT/vmquota/dashboard/static/vendor"

command -v npm >/dev/null 2>&1 || { echo "build-dashboard: npm is needed (Debian: apt-get install npm)" >&2; exit 2; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp "$NPM_DIR/package.json" "$NPM_DIR/package-lock.json" "$WORK/"
(cd "$WORK" && npm ci --ignore-scripts --no-audit --no-fund --cache "$WORK/.npm-cache" >&2)

UPLOT="$WORK/node_modules/uplot"
mkdir -p "$VENDOR"
install -m 0644 "$UPLOT/dist/uPlot.iife.min.js" "$VENDOR/uPlot.iife.min.js"
install -m 0644 "$UPLOT/dist/uPlot.min.css" "$VENDOR/uPlot.min.css"
install -m 0644 "$UPLOT/LICENSE" "$VENDOR/uPlot.LICENSE"

# What was shipped, with its version and digests: a reviewer can compare them with the package on the registry.
{
    echo "uplot $(node -p "require('$UPLOT/package.json').version")"
    (cd "$VENDOR" && sha256sum uPlot.iife.min.js uPlot.min.css uPlot.LICENSE)
} >"$VENDOR/MANIFEST"
echo "build-dashboard: vendor files in ${VENDOR#"$REPO_ROOT"/}:" >&2
cat "$VENDOR/MANIFEST" >&2
