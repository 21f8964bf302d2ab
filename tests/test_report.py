"""The interactive report in a real browser (headless Chromium): it renders with no JavaScript
error, its component graph has every node the study kept, and the threshold slider changes how
many edges are shown. A screenshot is left for a person to look at."""

import json
import shutil
import time

import pytest

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.mark.real
@pytest.mark.skipif(CHROMIUM is None or DRIVER is None, reason="needs Debian's chromium and chromium-driver "
                    "(make test installs them)")
def test_report_in_headless_chromium(tmp_path, sva_run):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    out = sva_run
    graph = json.loads((out / "component_graph.json").read_text())
    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,2000"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get((out / "report.html").as_uri())
        time.sleep(1.5)
        state = driver.execute_script("return window.ggReport")
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        assert state["nodeCount"] == len(graph["nodes"]) > 50
        shown = state["visibleEdges"]
        driver.execute_script("const s = document.getElementById('gg-threshold'); s.value = 0;"
                              "s.dispatchEvent(new Event('input'));")
        assert driver.execute_script("return window.ggReport.visibleEdges") > shown
        driver.execute_script("const s = document.getElementById('gg-threshold'); s.value = 40;"
                              "s.dispatchEvent(new Event('input'));")
        assert 0 < driver.execute_script("return window.ggReport.visibleEdges") < shown
        driver.execute_script("const m = document.getElementById('gg-method'); m.value = 'attn_lrp';"
                              "m.dispatchEvent(new Event('change'));")
        assert "AttnLRP" in driver.find_element("id", "gg-visible").text or driver.execute_script(
            "return document.getElementById('gg-method').selectedOptions[0].text").startswith("AttnLRP")
        assert driver.find_elements("css selector", "#gg-heatmaps .main-svg")  # plotly drew the heatmaps
        screenshot = tmp_path / "report.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        print(f"screenshot of the report: {screenshot}")
    finally:
        driver.quit()


@pytest.mark.skipif(CHROMIUM is None or DRIVER is None, reason="needs Debian's chromium and chromium-driver "
                    "(make test installs them)")
def test_circuit_report_in_headless_chromium(tmp_path):
    """``gradgraph circuit``'s page: no JavaScript error, the curves drawn, and each method's circuit
    a trace per drawn line (and one of its nodes), one method shown at a time."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    from gradgraph.cli import main

    out = tmp_path / "circuit"
    assert main(["circuit", "--model", "tiny-smollm2", "--items", "3", "--methods", "eap,random", "--resamples", "10",
                 "--size", "0.3", "--task", "copying", "--out", str(out)]) == 0
    lines = {m: len(json.loads((out / "circuit_tracer" / f"{m}.json").read_text())["links"]) for m in ("eap", "random")}
    assert min(lines.values()) > 0
    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,2400"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get((out / "report.html").as_uri())
        time.sleep(1.5)
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
        assert driver.find_elements("css selector", "#gg-curves .main-svg")
        traces = driver.execute_script("return document.getElementById('gg-circuits').data.map(t => t.visible)")
        visible = driver.execute_script("return document.getElementById('gg-circuits').data.filter("
                                        "t => t.visible !== false).length")
        assert len(traces) >= sum(lines.values()) + 2 and lines["eap"] < visible < len(traces)
        driver.save_screenshot(str(tmp_path / "circuit_report.png"))
        print(f"screenshot of the report: {tmp_path / 'circuit_report.png'}")
    finally:
        driver.quit()
