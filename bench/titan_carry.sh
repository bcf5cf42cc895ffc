#!/usr/bin/env bash
# Builds here what bench_titan.py needs on the lent GPU machine, which has no network:
#   .gpu_carry/titan/src  torchtitan at a pinned tag (its COMMIT file names it), exported from a git
#                         clone or snapshot of torchtitan given as the first argument
#   .whl/                 the wheels that machine's image lacks: torchao (float8), torchdata and tyro
#                         (torchtitan's imports), pydantic (lmforge's config), each with its own needs
# Both folders are git-ignored (.git/info/exclude) and travel as a call's `carry`; bench/titan_call.sh
# installs the wheels there and runs the bench.
#
#   bash bench/titan_carry.sh /path/to/torchtitan/git [v0.2.2]
set -euo pipefail
source_git=$(cd "${1:?give a git clone (or a bare snapshot) of torchtitan}" && pwd)
cd "$(dirname "$0")/.."
tag=${2:-v0.2.2}
for ignored in /.gpu_carry/ /.whl/; do
    grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done

commit=$(git -C "$source_git" rev-parse "$tag^{commit}")
rm -rf .gpu_carry/titan/src && mkdir -p .gpu_carry/titan/src
# tests/assets holds torchtitan's test data (a snapshot may lack its blobs); the bench needs none of it.
git -C "$source_git" archive "$commit" -- . ':!tests/assets' | tar -x -C .gpu_carry/titan/src
echo "$commit $tag" > .gpu_carry/titan/src/COMMIT

# The GPU image's Python is CPython 3.12 on x86-64; these are the versions the G7 records ran.
wheels=(torchao==0.17.0 torchdata==0.11.0 tyro==1.0.16 docstring-parser==0.18.0 typeguard==4.6.1
        pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.8.0 typing-inspection==0.4.5)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
rm -rf .whl && mkdir .whl
PIP_CONSTRAINT= python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "${wheels[@]}"
echo "torchtitan $tag ($commit) in .gpu_carry/titan/src ($(du -sh .gpu_carry/titan/src | cut -f1)); $(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1))"
