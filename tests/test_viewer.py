"""BrainLine's SEG and SR in a real viewer: OHIF 3.13 in headless Chromium.

A real study (tcga-du-7294 T1c written as DICOM, every 3rd slice) and the SEG
and SR built from the real BraTS 2020 reference segmentation of that case go
into a throw-away Orthanc with the DICOMweb plugin. The prebuilt OHIF viewer
from the npm package ``@ohif/app`` is served from a local HTTP server that
also proxies ``/dicom-web`` to that Orthanc (one origin, no CORS), configured
to hydrate SEG and SR without asking. Debian's chromium (headless, software
WebGL) is driven over the Chrome DevTools Protocol (``websockets``). Each
object is opened as a reader does (the T1c series, then a double-click on the
object's thumbnail once every image is in), and the test asserts:

* SEG: every segment label appears in OHIF's segmentation panel and the
  segment colours are drawn over the image (pixels of the viewport canvas);
* RANO SR: OHIF loads it as rehydratable (no "Measurement is not
  rehydratable" / "No measurements found which were rehydratable" in the
  console), every bidimensional measurement appears in the measurement panel
  with the long and short axes BrainLine computed (to 0.1 mm) and its finding,
  and the axes are drawn over the image (yellow annotation pixels).

Screenshots are written to the test's tmp dir (``seg.png``, ``sr.png``); with
``BRAINLINE_VIEWER_DOCS=1`` they also replace docs/ohif-seg.png and
docs/ohif-rano-sr.png.

The volumes SR (TID 1411/1501 groups without image coordinates) does not open
in OHIF 3.13 (an OHIF bug, see the strict xfail below); the RANO SR does.

Needs: Orthanc + DICOMweb plugin, chromium, npm (for ``npm pack @ohif/app``
when the viewer is not cached; ``BRAINLINE_OHIF_DIST`` may point at an
unpacked ``dist`` folder). scripts/install-system-deps.sh installs all three
and caches the viewer.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socketserver
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from brainline.pipelines.dicom_outputs import (
    LABELS,
    AlgorithmInfo,
    QCFinding,
    bidimensional_measurements,
    build_rano_sr,
    build_seg,
    build_sr,
    read_source_series,
    volume_summary,
)
from tests.browser import Browser, chromium_binary
from tests.dicom_factory import write_study
from tests.peers import DICOMWEB_PLUGIN, ORTHANC_BINARY, OrthancServer, free_port
from tests.test_dicom_outputs import TCGA, dicom_grid, load_brats2020

OHIF_VERSION = "3.13.2"
OHIF_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "brainline" / f"ohif-{OHIF_VERSION}"
ALGORITHM = AlgorithmInfo(name="BrainLine", version="0.1.0", backend="baseline", model_name="brainline-baseline",
                          model_version="2")



# ----------------------------------------------------------------- components


def ohif_dist() -> Path:
    """The unpacked ``dist`` folder of @ohif/app: BRAINLINE_OHIF_DIST, the cache,
    or ``npm pack`` into the cache now."""
    env = os.environ.get("BRAINLINE_OHIF_DIST")
    if env:
        return Path(env)
    dist = OHIF_CACHE / "package" / "dist"
    if (dist / "index.html").exists():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed and the OHIF viewer is not cached (run scripts/install-system-deps.sh)")
    OHIF_CACHE.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(OHIF_CACHE)],
                          capture_output=True, text=True, timeout=600)
    tgz = OHIF_CACHE / f"ohif-app-{OHIF_VERSION}.tgz"
    if proc.returncode != 0 or not tgz.exists():
        pytest.skip(f"npm pack @ohif/app@{OHIF_VERSION} failed: {proc.stderr.strip()[-500:]}")
    with tarfile.open(tgz) as tar:
        tar.extractall(OHIF_CACHE, filter="data")
    tgz.unlink()
    return dist


APP_CONFIG = """
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  disableConfirmationPrompts: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'BrainLine test Orthanc',
      name: 'orthanc',
      wadoUriRoot: '/wado',
      qidoRoot: '/dicom-web',
      wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video',
      bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""


class ViewerServer:
    """Serves the OHIF dist folder (SPA fallback to index.html), our app-config.js,
    and proxies /dicom-web and /wado to Orthanc."""

    def __init__(self, dist: Path, orthanc_url: str):
        self.dist, self.orthanc_url = dist, orthanc_url
        self.port = free_port()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(server.dist), **kw)

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path.startswith(("/dicom-web", "/wado")):
                    return self._proxy()
                if path == "/app-config.js":
                    body = APP_CONFIG.encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/javascript")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if path == "/sw.js" or path == "/init-service-worker.js":
                    self.send_error(404)
                    return
                if not (server.dist / path.lstrip("/")).is_file():
                    self.path = "/index.html"
                return super().do_GET()

            def _proxy(self):
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
                req = urllib.request.Request(server.orthanc_url + self.path, headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=120) as resp:
                        body, status, rh = resp.read(), resp.status, resp.headers
                except urllib.error.HTTPError as exc:
                    body, status, rh = exc.read(), exc.code, exc.headers
                self.send_response(status)
                for k in ("Content-Type",):
                    if rh.get(k):
                        self.send_header(k, rh[k])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.httpd = Server(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def viewer_env(tmp_path_factory):
    missing = [what for what, ok in (
        ("Orthanc", Path(ORTHANC_BINARY).exists()), ("Orthanc DICOMweb plugin", Path(DICOMWEB_PLUGIN).exists()),
        ("chromium", chromium_binary() is not None)) if not ok]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (run scripts/install-system-deps.sh)")
    dist = ohif_dist()
    root = tmp_path_factory.mktemp("viewer")
    study = write_study(root / "study", TCGA, slice_step=3, roles=("t1c",))
    t1c = study.series["t1c"]
    grid, _ = dicom_grid(t1c.dir)
    labels = sitk.Resample(load_brats2020("hnfnetv1-20"), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    summary = volume_summary(labels)
    summary["tiv_ml"] = 1432.5
    seg = build_seg(t1c.paths, labels, ALGORITHM)
    sr = build_sr(seg, t1c.paths, summary, [QCFinding("registration t2", "acceptable")], ALGORITHM)
    rano = build_rano_sr(seg, t1c.paths, ALGORITHM)
    out = root / "results"
    out.mkdir()
    seg.save_as(out / "seg.dcm")
    sr.save_as(out / "sr.dcm")
    rano.save_as(out / "rano.dcm")
    with OrthancServer() as orthanc:
        assert orthanc.upload_dir(t1c.dir) == len(t1c.paths)
        assert orthanc.upload_dir(out) == 3
        with ViewerServer(dist, orthanc.http_url) as server:
            yield dict(server=server, study=study, t1c=t1c, seg=seg, sr=sr, rano=rano, labels=labels, root=root)


@pytest.fixture()
def browser(viewer_env, tmp_path):
    b = Browser(chromium_binary(), tmp_path / "profile")
    # no onboarding tour over the viewport
    b.call("Page.addScriptToEvaluateOnNewDocument",
           source="localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
    try:
        yield b
    finally:
        b.close()


def _viewer_url(env, series_uid: str, sop_uid: str | None = None) -> str:
    url = (f"{env['server'].url}/viewer?StudyInstanceUIDs={env['study'].study_uid}"
           f"&initialSeriesInstanceUID={series_uid}")
    return url + (f"&initialSOPInstanceUID={sop_uid}" if sop_uid else "")


BODY_TEXT = "((document.body && document.body.innerText) || '')"


def _open_panel(browser: Browser, data_cy: str) -> None:
    browser.wait_for(f"!!document.querySelector('[data-cy=\"{data_cy}\"]')", timeout=240, what=data_cy)
    browser.evaluate(f"document.querySelector('[data-cy=\"{data_cy}\"]').click()")


def _viewport(browser: Browser, img: np.ndarray) -> np.ndarray:
    """The part of a screenshot covered by the (first) viewport pane."""
    rect = browser.evaluate("(() => { const e = document.querySelector('[data-cy=\"viewport-pane\"]');"
                            " const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })()")
    x0, y0, x1, y1 = (int(round(v)) for v in rect)
    return img[y0 + 2:y1 - 2, x0 + 2:x1 - 2]


def _hue_pixels(img: np.ndarray) -> dict[str, int]:
    """Saturated pixels by colour: the greyscale MR image has none."""
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return {
        "red": int(np.count_nonzero((r - g > 60) & (r - b > 60))),
        "green": int(np.count_nonzero((g - r > 60) & (g - b > 60))),
        "yellow": int(np.count_nonzero((r - b > 80) & (g - b > 80) & (np.abs(r - g) < 80))),
    }


HUE_OF_LABEL = {1: "red", 2: "green", 3: "yellow"}


def _current_instance(browser: Browser) -> int | None:
    """Instance number in OHIF's viewport overlay ("I:45 (8/52)")."""
    value = browser.evaluate(f"(() => {{ const m = {BODY_TEXT}.match(/I:\\s*(\\d+)\\s*\\(/);"
                             " return m ? Number(m[1]) : null; })()")
    return None if value is None else int(value)


# The first viewport's identity and whether a segmentation is drawn on it. The
# tag marks the JS viewport object, so a viewport OHIF replaced reads as new.
_VIEWPORT_STATE = """(() => {
  const cs = window.cornerstone, tools = window.cornerstoneTools;
  const engines = cs && cs.getRenderingEngines ? cs.getRenderingEngines() : [];
  const viewports = engines.length ? engines[0].getViewports() : [];
  if (!viewports.length || viewports[0].isDisabled) return null;
  const vp = viewports[0];
  vp.__brainlineTag = vp.__brainlineTag || Math.random().toString(36).slice(2);
  const segs = tools.segmentation.state.getSegmentationRepresentations(vp.id) || [];
  return vp.__brainlineTag + ' ' + segs.length;
})()"""


def _wait_for_settled_viewport(browser: Browser, segmentation: bool, quiet: float = 3.0,
                               timeout: float = 240) -> None:
    """Wait until OHIF stops replacing the first viewport.

    Hydrating a SEG swaps the viewport for a new one, and on a loaded machine
    the segment labels reach the panel before the swap. A wheel scroll on the
    old viewport then fires cornerstone's debounced setImageIdIndex on a
    destroyed viewport (an EXCEPTION in the console). So: wait for the same
    viewport object (with a segmentation drawn on it, when ``segmentation``)
    to stay for ``quiet`` seconds.
    """
    deadline = time.monotonic() + timeout
    state, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = browser.evaluate(_VIEWPORT_STATE)
        if now != state:
            state, since = now, time.monotonic()
        ready = state is not None and (not segmentation or not state.endswith(" 0"))
        if ready and time.monotonic() - since >= quiet:
            return
        browser.pump(0.2)
    raise AssertionError(f"the viewport did not settle (last: {state}); console tail: {browser.console[-15:]}")


_ALL_IMAGES_CACHED = """(() => {
  const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const ids = vp.getImageIds ? vp.getImageIds() : [];
  return ids.length > 0 && ids.every(id => window.cornerstone.cache.isLoaded(id));
})()"""


def _open_after_images(browser: Browser, env, description: str) -> None:
    """Open a SEG or SR as a reader does: the image series first, then, once
    every image is in, a double-click on the object's study-browser thumbnail
    (the one whose text holds ``description``).

    Opened straight from the URL instead, OHIF 3.13 jumps to the object's
    slice with a debounced scroll on a viewport it replaces 40 ms later while
    images are still loading: an EXCEPTION and a route error boundary on a
    loaded machine, whatever the object holds.
    """
    browser.navigate(_viewer_url(env, str(env["t1c"].series_uid)))
    _wait_for_settled_viewport(browser, segmentation=False)
    browser.wait_for(_ALL_IMAGES_CACHED, timeout=240, what="every image of the series in the viewer's cache")
    find = ("Array.from(document.querySelectorAll('[data-cy^=\"study-browser-thumbnail\"]'))"
            f".find(e => e.innerText.includes({json.dumps(description)}))")
    browser.wait_for(f"!!{find}", timeout=240, what=f"the thumbnail of {description!r}")
    browser.evaluate(f"{find}.dispatchEvent(new MouseEvent('dblclick', {{bubbles: true}}))")


def _scroll_to_instance(browser: Browser, target: int, max_steps: int = 120) -> None:
    """Mouse-wheel the viewport until its overlay shows instance ``target``."""
    rect = browser.evaluate("(() => { const r = document.querySelector('[data-cy=\"viewport-pane\"]')"
                            ".getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()")
    browser.wait_for(f"/I:\\s*\\d+\\s*\\(/.test({BODY_TEXT})", timeout=240, what="image overlay")
    direction = 100
    last = _current_instance(browser)
    for _ in range(max_steps):
        if last == target:
            return
        browser.call("Input.dispatchMouseEvent", type="mouseWheel", x=rect[0], y=rect[1], deltaX=0,
                     deltaY=direction)
        now, deadline = last, time.monotonic() + 3.0
        while now == last and time.monotonic() < deadline:  # wait for the overlay to follow
            browser.pump(0.1)
            now = _current_instance(browser)
        if now is not None and last is not None and (now == last or abs(now - target) > abs(last - target)):
            direction = -direction  # moving away from the target, or stuck at an end of the stack
        last = now
    raise AssertionError(f"could not scroll to instance {target} (at {last})")


# ------------------------------------------------------------------------ tests


def test_seg_segments_listed_and_drawn(viewer_env, browser, tmp_path):
    env = viewer_env
    seg = env["seg"]
    series = read_source_series(env["t1c"].paths)
    arr = sitk.GetArrayFromImage(env["labels"])
    present = [v for v in sorted(LABELS) if np.any(arr == v)]
    # the slice where the least represented label is largest: every segment shows
    k = int(np.argmax(np.min([np.count_nonzero(arr == v, axis=(1, 2)) for v in present], axis=0)))
    _open_after_images(browser, env, str(seg.SeriesDescription))
    _open_panel(browser, "panelSegmentation-btn")
    labels = [str(item.SegmentLabel) for item in seg.SegmentSequence]
    browser.wait_for(f"(() => {{ const t = {BODY_TEXT}; return " + " && ".join(
        f"t.includes({json.dumps(label)})" for label in labels) + "; })()",
        timeout=240, what=f"segment labels {labels} in the segmentation panel")
    _wait_for_settled_viewport(browser, segmentation=True)
    _scroll_to_instance(browser, int(series.datasets[k].InstanceNumber))
    browser.pump(8)
    img = browser.screenshot(tmp_path / "seg.png")
    hues = _hue_pixels(_viewport(browser, img))
    for value in present:
        assert hues[HUE_OF_LABEL[value]] > 30, (LABELS[value].segment_label, hues, tmp_path / "seg.png")
    console = "\n".join(browser.console)
    assert "EXCEPTION" not in console and "Error Boundary" not in console, console[-3000:]
    if os.environ.get("BRAINLINE_VIEWER_DOCS"):  # refresh the screenshot in docs/
        shutil.copy(tmp_path / "seg.png", Path(__file__).resolve().parents[1] / "docs" / "ohif-seg.png")


def test_rano_sr_rehydrated_and_drawn(viewer_env, browser, tmp_path):
    env = viewer_env
    rano = env["rano"]
    expected = bidimensional_measurements(env["seg"], read_source_series(env["t1c"].paths))
    assert expected
    _open_after_images(browser, env, str(rano.SeriesDescription))
    _open_panel(browser, "trackedMeasurements-btn")
    browser.wait_for(f"{BODY_TEXT}.includes('Measurements ({len(expected)})')", timeout=240,
                     what=f"{len(expected)} rehydrated measurements in the measurement panel")
    text = browser.wait_for(f"(() => {{ const t = {BODY_TEXT}; return /W: \\d/.test(t) ? t : ''; }})()",
                            timeout=120, what="long and short axis in the measurement panel")
    for m, enhancing in expected:
        assert f"L: {m.measurement.long_mm:.1f} mm" in text, text
        assert f"W: {m.measurement.short_mm:.1f} mm" in text, text
        assert ("Enhancing Lesion" if enhancing else "Non-Enhancing Lesion") in text
    browser.pump(5)
    img = browser.screenshot(tmp_path / "sr.png")
    viewport = _viewport(browser, img)
    assert float(viewport.std()) > 10, "black viewport"
    assert _hue_pixels(viewport)["yellow"] > 50, tmp_path / "sr.png"  # the two axes are drawn
    console = "\n".join(browser.console)
    assert "Measurement is not rehydratable" not in console, console[-3000:]
    assert "No measurements found which were rehydratable" not in console, console[-3000:]
    assert "Error Boundary" not in console and "EXCEPTION" not in console, console[-3000:]
    if os.environ.get("BRAINLINE_VIEWER_DOCS"):  # refresh the screenshot in docs/
        shutil.copy(tmp_path / "sr.png", Path(__file__).resolve().parents[1] / "docs" / "ohif-rano-sr.png")


@pytest.mark.xfail(strict=True, reason=(
    "OHIF 3.13 bug: _checkIfCanAddMeasurementsToDisplaySet (extensions/cornerstone-dicom-sr) reads "
    "measurement.coords[0].ReferencedSOPSequence for every measurement, also for TID 1500 groups without "
    "image coordinates (TID 1411 volumes), and the viewer route fails (black viewport). The volumes stay in "
    "their own SR; the planar measurements are in the RANO SR. Strict: passes once OHIF is fixed."))
def test_volume_sr_opens_in_ohif(viewer_env, browser, tmp_path):
    env = viewer_env
    browser.navigate(_viewer_url(env, str(env["sr"].SeriesInstanceUID)))
    _open_panel(browser, "trackedMeasurements-btn")
    # Watch the console for 30 s. The console only grows, so once "Error
    # Boundary" is in it the assertion below fails whatever comes later: stop
    # watching then (OHIF 3.13 gets there in a few seconds). A fixed OHIF is
    # still watched the whole 30 s before it counts as passing.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any("Error Boundary" in line for line in browser.console):
        browser.pump(min(0.5, max(0.0, deadline - time.monotonic())))
    browser.screenshot(tmp_path / "volumes_sr.png")
    console = "\n".join(browser.console)
    assert "Error Boundary" not in console, console[-2000:]
