"""Look at the built site in a real browser: `python -m docs.browser` (after `python -m docs`).

Opens the landing page and the CDSCallback page (nbs/12_cds.ipynb) from the disk in headless Chromium, checks what a
reader must see, and saves full-page screenshots to `_build/screenshots/`. On the CDSCallback page: the API entry of
`CDSCallback` with its argument table, a progress table (a saved output that prints `epoch` and `train_loss`) and a
plot (a saved image, loaded). It exits 1, naming what is missing, otherwise 0.

Needs Debian's Chromium and the Python package playwright (its driver only; it downloads no browser):
`apt-get update && apt-get install -y chromium` and `pip install -e ".[browser]"`."""
from __future__ import annotations
import argparse, shutil, sys
from pathlib import Path

from docs.build import BUILD

CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync',
                 '--disable-default-apps', '--disable-extensions']


def chromium() -> str:
    "Path of the system's Chromium"
    for name in ('chromium', 'chromium-browser', 'google-chrome'):
        if p := shutil.which(name): return p
    raise FileNotFoundError("no Chromium on this machine: `apt-get update && apt-get install -y chromium`")


def _visible(page, selector:str, has_text:str|None=None) -> bool:
    loc = page.locator(selector, has_text=has_text) if has_text else page.locator(selector)
    return loc.count() > 0 and loc.first.is_visible()


def check_site(site=BUILD/'site', shots=BUILD/'screenshots', width:int=1280) -> list[str]:
    "Open the landing and CDSCallback pages of `site` in headless Chromium, save screenshots to `shots`; return what is missing"
    from playwright.sync_api import sync_playwright
    site, shots = Path(site).resolve(), Path(shots)
    shots.mkdir(parents=True, exist_ok=True)
    missing = []
    for f in ('index.html', 'cds.html'):
        if not (site/f).exists(): missing.append(f'{site/f} does not exist: build the site first (`python -m docs`)')
    if missing: return missing
    with sync_playwright() as pw:  # a new empty profile each launch (playwright's own temporary folder)
        browser = pw.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={'width': width, 'height': 900})
        errors = []
        page.on('pageerror', lambda e: errors.append(str(e)))
        page.goto((site/'index.html').as_uri(), wait_until='load')
        if not _visible(page, 'h1', 'fastai_cds'): missing.append('index.html: no visible `fastai_cds` title')
        if not _visible(page, 'nav a', 'CDSCallback'): missing.append('index.html: no link to the CDSCallback page in the navigation')
        page.screenshot(path=str(shots/'index.png'), full_page=True)
        page.goto((site/'cds.html').as_uri(), wait_until='load')
        if not _visible(page, 'h3#cdscallback'): missing.append('cds.html: no visible API entry `CDSCallback`')
        elif not _visible(page, 'table', 'temperature'): missing.append("cds.html: no visible argument table of `CDSCallback`")
        if not _visible(page, 'pre.nb-stream', 'train_loss'):
            missing.append('cds.html: no visible progress table (no saved output printing `train_loss`: run nbs/12_cds.ipynb '
                           'and save it with its outputs)')
        plots = page.locator('img.nb-plot')
        if plots.count() == 0 or not plots.first.is_visible():
            missing.append('cds.html: no visible plot (no saved image output: run nbs/12_cds.ipynb and save it with its outputs)')
        elif not plots.first.evaluate('i => i.complete && i.naturalWidth > 0'): missing.append('cds.html: the plot did not load')
        page.screenshot(path=str(shots/'cds.png'), full_page=True)
        if errors: missing.append(f'JavaScript errors: {errors}')
        browser.close()
    return missing


def main(argv=None):
    ap = argparse.ArgumentParser(prog='python -m docs.browser', description=__doc__.split('\n\n')[0])
    ap.add_argument('--site', default=str(BUILD/'site'))
    ap.add_argument('--shots', default=str(BUILD/'screenshots'), help='folder of the screenshots')
    a = ap.parse_args(argv)
    missing = check_site(a.site, a.shots)
    for m in missing: print(f'missing: {m}', file=sys.stderr)
    if not missing: print(f'landing and CDSCallback pages look right; screenshots in {a.shots}')
    return 1 if missing else 0


if __name__ == '__main__': sys.exit(main())
