"""`kiln report` of a SmolLM2 compile, opened in headless Chromium: no console errors, a
pass's changes with the rule that made them, the rule itself, the graph picture clicked
through to the IR, a generated kernel, and a screenshot that is not blank.

It lives here for the session's SmolLM2 artifact (conftest.py): its captured graph
(ir/000_input.kir) is compiled again for cuda into a KILN_DUMP_DIR tree, which gives the
generated Triton kernels a CPU target has not (they are generated, never run).

Chromium and its driver come from the distribution (`make system-packages`, which `make
test` runs), selenium from the test extra; the driver is named explicitly, so Selenium
Manager downloads nothing. Without them the test skips on a workstation and fails under CI
(the CI environment variable, which .ci/run sets).
"""
from __future__ import annotations

import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest

PROGRAMS = {"chromium": "chromium", "chromedriver": "chromium-driver", "dot": "graphviz"}


def _missing() -> str | None:
    """Why the test cannot run here, or None."""
    missing = [package for program, package in PROGRAMS.items() if shutil.which(program) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if not missing:
        return None
    return (f"the kiln report browser test needs {', '.join(missing)}: run `make "
            f"system-packages` as root (apt-get install chromium chromium-driver graphviz)")


MISSING = _missing()
if MISSING and not os.environ.get("CI"):   # before the session's SmolLM2 artifact is built
    pytest.skip(MISSING, allow_module_level=True)


def png_colours(data: bytes) -> set[bytes]:
    """The distinct RGB colours of an 8-bit RGB or RGBA PNG (what Chromium's screenshots are)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour_type = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour_type in (2, 6), (depth, colour_type)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    bpp = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(b"".join(idat)), width * bpp
    prev, colours = bytearray(stride), set()
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):   # undo the row's filter (PNG spec, section 9)
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if kind == 1:
                row[i] = (row[i] + a) & 255
            elif kind == 2:
                row[i] = (row[i] + b) & 255
            elif kind == 3:
                row[i] = (row[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        colours.update(bytes(row[i:i + 3]) for i in range(0, stride, bpp))
        prev = row
    return colours


@pytest.fixture(scope="module")
def smollm2_report(smollm2_artifact, tmp_path_factory) -> tuple[Path, float]:
    """(the report of SmolLM2's serving graph compiled for cuda, seconds to write it)."""
    import kiln
    from kiln.cli import main
    from kiln.ir import parse
    from kiln.serving import retarget_devices
    tmp = tmp_path_factory.mktemp("report")
    graph = parse((smollm2_artifact / "ir" / "000_input.kir").read_text())
    retarget_devices(graph, "cuda")
    kiln.compile(graph, target="cuda", serving=True, cudagraphs=False, dump_dir=str(tmp / "dump"))
    t0 = time.perf_counter()
    assert main(["report", str(tmp / "dump"), "-o", str(tmp / "report.html")]) == 0
    return tmp / "report.html", time.perf_counter() - t0


@pytest.fixture
def browser(monkeypatch):
    if MISSING:   # under CI, where make test installs them
        pytest.fail(MISSING)
    monkeypatch.setenv("SE_OFFLINE", "true")   # should Selenium Manager run: never the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options,
                              service=Service(executable_path=shutil.which("chromedriver")))
    yield driver
    driver.quit()


def test_smollm2_report_in_chromium(browser, smollm2_report, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    report, seconds = smollm2_report
    assert report.stat().st_size < 4 * 2**20 and seconds < 60, (report.stat().st_size, seconds)
    wait = WebDriverWait(browser, 30)
    browser.get(report.as_uri())
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "nav a[data-route='g0/p1']"))
    passes = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "nav a[data-route^='g0/p']")]

    # a pass: its changes, each line with the rule that made it
    norm = next(i for i, text in enumerate(passes) if "fuse.norm" in text)
    browser.find_element(By.CSS_SELECTOR, f"nav a[data-route='g0/p{norm}']").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".tab-body[data-tab='changes'] .l.add"))
    added = browser.find_elements(By.CSS_SELECTOR, ".diff .l.add")
    removed = browser.find_elements(By.CSS_SELECTOR, ".diff .l.del")
    rules = [[t.text for t in row.find_elements(By.CSS_SELECTOR, "a.tag.rule")] for row in added]
    assert all(rules) and {r for tags in rules for r in tags} == {"rms_norm", "fused_add_rms_norm"}
    # one a layer but the first, whose norm has no residual to add
    assert sum("kiln.fused_add_rms_norm(" in row.text for row in added) == 60
    assert any("aten.rsqrt(" in row.text for row in removed)
    # ... linked to the rule's file and line
    next(row for row in added if "kiln.rms_norm(" in row.text).find_element(
        By.CSS_SELECTOR, "a.tag.rule").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".l.flash"))
    assert browser.find_element(By.CSS_SELECTOR, ".l.flash .src").text.startswith("rule rms_norm ")

    # its graph picture, a node clicked through to its IR line
    browser.back()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "a[data-tab='graph']"))
    browser.find_element(By.CSS_SELECTOR, "a[data-tab='graph']").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".picture svg g.node.changed"))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".picture svg g.node")) > 1000
    node = browser.find_element(By.CSS_SELECTOR, ".picture svg g.node.changed")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", node)
    node.click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".tab-body[data-tab='ir'] .l.flash"))
    assert "= kiln." in browser.find_element(By.CSS_SELECTOR, ".l.flash .src").text

    # a generated kernel, from the kernels of the graph
    browser.find_element(By.CSS_SELECTOR, "nav a[data-route='g0/kernels']").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "main table a[href*='/kernel/']"))
    link = browser.find_element(By.CSS_SELECTOR, "main table a[href*='/kernel/']")
    name = link.text
    link.click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".kernel-source .l"))
    source = browser.find_element(By.CSS_SELECTOR, ".kernel-source").text
    assert "@triton.jit" in source and f"def {name}_kernel(" in source

    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    assert len(png_colours(shot.read_bytes())) > 50   # text, tables, highlights: not blank
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
