"""The web dashboard's files: one page, its script and style, and the vendored uPlot (`static/`).

Plain data, no code that runs in the server: `vmquota/apiserver/dashboard.py` serves these files at `/` and
`/ui/...`, and the page then reads vmquota's own API with the browser user's credentials. `static/vendor/` is
written by `scripts/build-dashboard.sh` from the npm registry (`npm/package-lock.json`, integrity checked) and
committed, so that serving needs neither node nor a network.
"""
