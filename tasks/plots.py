"""`make plots`: dvc.yaml's charts as one HTML page that draws every chart offline (#39).

`dvc plots show` writes a page whose Vega charts load vega, vega-lite and vega-embed from a public
CDN: offline, only the PNGs show and every Vega chart is blank, silently. Here the three scripts
come from npm tarballs pinned by version and sha512 integrity (PINS), fetched once with
`npm pack --ignore-scripts` into the cache (LMFORGE_CACHE/npm, default ~/.cache/lmforge/npm) and
checked against their pin before anything reads them (a cached tarball too, on every run). They are
inlined into an HTML template that DVC fills through `--html-template`. DVC 3's template (dvc-render)
must hold `{plot_divs}`, the chart divs; `{scripts}`, where DVC puts its CDN tags, is left out.

    python -m tasks.plots [--out DIR]   # DIR/index.html; without --out DVC's own dvc_plots/

The pinned versions are the newest of the lines DVC's own page loads (vega 5, vega-lite 5,
vega-embed 6). To move a pin: `npm pack --json NAME@VERSION` prints the new integrity.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError
from lmforge.training.base_models import cache_root


class PlotsError(UserError):
    """A pinned script cannot be fetched or verified, or the page still loads one from outside."""


@dataclass(frozen=True)
class NpmScript:
    name: str
    version: str
    integrity: str  # npm's "sha512-<base64>" of the tarball
    member: str  # the browser build inside the tarball

    @property
    def tarball(self) -> str:
        return f"{self.name}-{self.version}.tgz"


# In load order: vega-lite needs vega, vega-embed both.
PINS = (
    NpmScript("vega", "5.33.1",
              "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
              "package/build/vega.min.js"),
    NpmScript("vega-lite", "5.23.0",
              "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
              "package/build/vega-lite.min.js"),
    NpmScript("vega-embed", "6.29.0",
              "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
              "package/build/vega-embed.min.js"),
)

# What dvc-render replaces in a template, and what would end an inline script early.
PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")
UNSAFE_INLINE = re.compile(r"</script|<script|<!--", re.IGNORECASE)
# A script or stylesheet the browser would fetch from elsewhere: src/href to http(s): or //host.
EXTERNAL = re.compile(r"<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//[^\"'\s>]*", re.IGNORECASE)

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
{inlined}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def integrity_of(path: Path) -> str:
    """npm's integrity string of a file: sha512, base64."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha512").digest()
    return "sha512-" + base64.b64encode(digest).decode()


def npm_pack(pin: NpmScript, dest: Path) -> Path:
    """Download the pinned tarball into dest with npm (no package script runs)."""
    npm = shutil.which("npm")
    if npm is None:
        raise PlotsError(f"npm is needed once to fetch {pin.tarball} (apt-get install -y npm), "
                         f"or put the pinned tarball in {dest}")
    result = subprocess.run([npm, "pack", "--ignore-scripts", "--silent", "--pack-destination", str(dest),
                             f"{pin.name}@{pin.version}"], cwd=dest, capture_output=True, text=True)
    if result.returncode != 0 or not (dest / pin.tarball).exists():
        raise PlotsError(f"npm pack {pin.name}@{pin.version} failed: {result.stderr.strip()[-2000:]}")
    return dest / pin.tarball


def verified_tarball(pin: NpmScript, cache: Path) -> Path:
    """The pinned tarball from the cache, fetched first if absent; checked against its pin either way."""
    path = cache / pin.tarball
    if path.exists():
        if integrity_of(path) == pin.integrity:
            return path
        print(f"warning: {path} does not match its pinned integrity; fetching it again", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        fetched = npm_pack(pin, Path(tmp))
        actual = integrity_of(fetched)
        if actual != pin.integrity:
            raise PlotsError(f"{pin.tarball}: integrity mismatch: expected {pin.integrity}, got {actual}. "
                             "The package changed or the pin is wrong; if the new one is intended, update PINS.")
        os.replace(fetched, path)
    return path


def read_script(pin: NpmScript, tarball: Path) -> str:
    """The browser build inside a verified tarball, refused if it could not sit inline in the page."""
    with tarfile.open(tarball, "r:gz") as archive:
        try:
            member = archive.extractfile(pin.member)
        except KeyError:
            member = None
        if member is None:
            raise PlotsError(f"{pin.tarball} holds no file {pin.member}")
        script = member.read().decode("utf-8")
    found = [match.group(0) for match in UNSAFE_INLINE.finditer(script)] + [p for p in PLACEHOLDERS if p in script]
    if found:
        raise PlotsError(f"{pin.tarball}:{pin.member} holds {found[0]!r}: it cannot be inlined into the page")
    return script


def pinned_scripts(cache: Path | None = None) -> list[str]:
    """The three scripts, in load order, each from its verified tarball."""
    cache = cache or cache_root() / "npm"
    return [read_script(pin, verified_tarball(pin, cache)) for pin in PINS]


def write_template(path: Path, scripts: list[str]) -> Path:
    """DVC's page with the scripts inline in place of its CDN tags."""
    inlined = "\n".join(f'    <script type="text/javascript">\n{script}\n    </script>' for script in scripts)
    page = PAGE.format(inlined=inlined, refresh_tag="{refresh_tag}", plot_divs="{plot_divs}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def external_sources(page: str) -> list[str]:
    """Every script src or link href of the page that points off the machine."""
    return [match.group(0) for match in EXTERNAL.finditer(page)]


def show(repo: Path | str = ".", out: Path | str | None = None, cache: Path | None = None) -> Path:
    """`dvc plots show` in repo with the offline template; return the page it wrote."""
    repo = Path(repo).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        template = write_template(Path(tmp) / "offline.html", pinned_scripts(cache))
        out = repo / (out if out is not None else "dvc_plots")
        command = [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(template), "-o", str(out)]
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        raise PlotsError(f"dvc plots show failed ({result.returncode})")
    page = out / "index.html"
    outside = external_sources(page.read_text(encoding="utf-8"))
    if outside:
        raise PlotsError(f"{page} still loads from outside: {', '.join(outside)}")
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dvc.yaml's charts as one HTML page that renders offline.")
    parser.add_argument("--out", default=None, help="the page's folder (default: DVC's, dvc_plots)")
    args = parser.parse_args(argv)
    try:
        page = show(".", args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(page.resolve().as_uri())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
