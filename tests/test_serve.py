"""`vlm serve`: a real uvicorn server on 127.0.0.1, searched over HTTP and looked at in headless Chromium.

The browser is driven through the Chrome DevTools Protocol (a websocket; `websockets` is the client): the
test reads the rendered DOM, counts viewer tiles the page loaded, collects console errors, exceptions and
failed requests, and keeps a screenshot in its temporary folder.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.support.frozen import build_frozen_run
from vlm.cli import main
from vlm.formats.embeddings import read_slide_embeddings
from vlm.retrieval import SlideIndex

REPO = Path(__file__).parents[1]
TASK = REPO / "prompts" / "demo_morphology.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, slide_05: Path, slide_025: Path) -> dict:
    """Two slides in one folder, their features, a tiny frozen model and a flat index with metadata."""
    root = tmp_path_factory.mktemp("site")
    slides = root / "slides"
    slides.mkdir()
    paths = [Path(shutil.copy(p, slides / p.name)) for p in (slide_05, slide_025)]
    run = build_frozen_run(root, paths)
    frame = read_slide_embeddings(run["parquet"])
    metadata = frame[["slide_id"]].assign(split=["train", "test"], label=["papillary", "solid"])
    SlideIndex.build(run["model"], np.stack(frame["embedding"]), list(frame["slide_id"]), metadata=metadata,
                     kind="flat").save(root / "index")
    (root / "secret.txt").write_text("outside the slide roots")
    (slides / "link.tiff").symlink_to(root / "secret.txt")  # a slide-looking link that leaves the root
    # a first slide root whose entry for an indexed id is a link to a slide outside every root
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "synthetic_05.tiff").symlink_to(slide_025)
    return {**run, "root": root, "slides": slides, "index": root / "index", "ids": list(frame["slide_id"])}


@contextlib.contextmanager
def running_server(
    args: list[str], host: str = "127.0.0.1", port: int | None = None, output: list[str] | None = None
) -> Iterator[str]:
    """`python -m vlm serve ARGS --host H --port P` in a subprocess (real uvicorn); yields its base URL.

    With `port=0` the base URL is the one `vlm serve` prints (the port it bound); `output`, if given, receives
    everything the server wrote once it stops.
    """
    port = free_port() if port is None else port
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "vlm", "serve", *args, "--host", host, "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://{host}:{port}"
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        if port == 0:
            while not (found := re.search(r"open (http://\S+?)/ ", lines[-1] if lines else "")):
                line = process.stdout.readline()
                if not line or time.monotonic() > deadline:
                    raise RuntimeError("vlm serve printed no address:\n" + "".join(lines))
                lines.append(line)
            base = found.group(1)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vlm serve exited with {process.returncode}:\n{process.stdout.read()}")
            try:
                urllib.request.urlopen(base + "/", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise TimeoutError("vlm serve did not answer within 120 s") from None
                time.sleep(0.3)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        if output is not None:
            output.append("".join(lines) + process.stdout.read())


@pytest.fixture(scope="module")
def server(site: dict) -> Iterator[str]:
    roots = [str(site["root"] / "elsewhere"), str(site["slides"])]
    features = str(site["root"] / "features")
    with running_server(["--index", str(site["index"]), "--slides", *roots, "--features", features,
                         "--task", str(TASK)]) as base:
        yield base


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("content-type", ""), error.read()


def test_search_page_lists_results_server_side(server: str, site: dict) -> None:
    status, kind, body = get(server + "/?q=" + urllib.parse.quote("papillary fronds"))
    html = body.decode()
    assert status == 200 and kind.startswith("text/html")
    ids = re.findall(r'class="result" data-slide-id="([^"]+)"', html)
    assert sorted(ids) == sorted(site["ids"])
    assert "split: test" in html and "label: solid" in html and "/thumb/" in html
    status, kind, body = get(server + f"/thumb/{ids[0]}.png")
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_api_mirrors_vlm_search_json(server: str, site: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["search", "--index", str(site["index"]), "papillary fronds", "-k", "2", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    status, kind, body = get(server + "/api/search?k=2&q=" + urllib.parse.quote("papillary fronds"))
    assert status == 200 and kind == "application/json"
    got = json.loads(body)  # scores to float tolerance: two processes may sum in another order (BLAS threads)
    assert [{**row, "score": None} for row in got] == [{**row, "score": None} for row in expected]
    assert [row["score"] for row in got] == pytest.approx([row["score"] for row in expected], abs=1e-6)
    status, _, body = get(server + f"/api/search?slide_id={site['ids'][0]}&k=1")
    assert status == 200 and json.loads(body)[0]["slide_id"] == site["ids"][1]  # similar slides


@pytest.mark.parametrize(
    "query, message",
    [("/?q=", "the search text is empty"), ("/?q=" + "x" * 600, "keep it under 500"),
     ("/?q=a&page_no=zero", "bad request"), ("/?q=a&page_no=-3", "out of range"),
     ("/?similar=nope", "no slide")],
)
def test_bad_queries_get_a_page_with_a_message(server: str, query: str, message: str) -> None:
    status, kind, body = get(server + query)
    assert status in (400, 404) and kind.startswith("text/html")
    assert message in body.decode()


def test_api_errors_are_json(server: str) -> None:
    status, kind, body = get(server + "/api/search?q=")
    assert status == 400 and "empty" in json.loads(body)["error"]
    status, kind, body = get(server + "/api/search?k=abc&q=x")
    assert status == 400 and "error" in json.loads(body)


@pytest.mark.parametrize(
    "path",
    ["/static/../pyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml", "/static/..%2f..%2fpyproject.toml",
     "/slide/..%2Fsecret.txt", "/thumb/..%2F..%2Fsecret.txt.png", "/dzi/..%2Fsecret.txt.dzi",
     "/dzi/link.dzi", "/thumb/link.png", "/dzi/%2Fetc%2Fpasswd.dzi", "/heat/..%2Fslide_encoder.png?q=x",
     "/dzi/synthetic_05_files/0/0_0.jpeg/../../../../secret.txt", "/static//etc/passwd"],
)
def test_no_url_reads_outside_the_slide_roots(server: str, path: str) -> None:
    # urllib would normalise dot segments away; a raw request sends the path as written
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    status = int(response.split(b" ", 2)[1])
    assert status in (404, 400), (path, response[:200])
    assert b"outside the slide roots" not in response and b"[project]" not in response and b"root:" not in response


def test_a_link_out_of_the_slide_roots_is_not_followed(server: str) -> None:
    """`elsewhere/synthetic_05.tiff` links to the 4096-px slide outside the roots: the real 2048-px one is served."""
    status, _, body = get(server + "/dzi/synthetic_05.dzi")
    assert status == 200 and b'Width="2048"' in body


def test_deep_zoom_tiles_and_bounds(server: str, site: dict) -> None:
    slide_id = site["ids"][0]
    status, _, body = get(server + f"/dzi/{slide_id}.dzi")
    assert status == 200 and b"<Image" in body
    levels = (int(re.search(rb'Width="(\d+)"', body).group(1)) - 1).bit_length() + 1  # ceil(log2 w) + 1
    status, kind, tile = get(server + f"/dzi/{slide_id}_files/{levels - 1}/0_0.jpeg")
    assert status == 200 and kind == "image/jpeg" and tile[:2] == b"\xff\xd8"
    assert get(server + f"/dzi/{slide_id}_files/{levels + 5}/0_0.jpeg")[0] == 404
    assert get(server + f"/dzi/{slide_id}_files/0/9_9.jpeg")[0] == 404


def test_slide_page_has_viewer_heat_zeroshot_and_similar(server: str, site: dict) -> None:
    slide_id = site["ids"][0]
    status, _, body = get(server + f"/slide/{slide_id}?q=papillary")
    html = body.decode()
    assert status == 200
    assert "openseadragon.min.js" in html and f"/heat/{slide_id}.png?q=papillary" in html
    assert 'id="zeroshot"' in html and "papillary" in html and 'id="similar"' in html
    status, kind, heat = get(server + f"/heat/{slide_id}.png?q=papillary")
    assert status == 200 and heat[:4] == b"\x89PNG"


def test_a_slide_pages_numbers_come_from_python_as_the_server_shows_them(server: str, site: dict) -> None:
    """`load_state` + `slide_page` give, without HTTP, the heat score and probabilities the page renders."""
    from PIL import Image

    from vlm.serve.pages import slide_page
    from vlm.serve.state import load_state

    state = load_state(site["index"], slides=[site["slides"]], features=[site["root"] / "features"], task=TASK)
    slide_id = site["ids"][0]
    page = slide_page(state, slide_id, "papillary")
    assert page.notes == [] and len(page.probabilities) == 3
    html = get(server + f"/slide/{slide_id}?q=papillary")[2].decode()
    score = float(re.search(r'slide score <span class="score">(-?[0-9.]+)<', html).group(1))
    assert score == pytest.approx(page.heat_score, abs=1e-3)
    rows = re.findall(r'<tr><td>([^<]+)</td><td class="score">([0-9.]+)<', html)
    assert [name for name, _ in rows] == [name for name, _ in page.probabilities]
    assert [float(p) for _, p in rows] == pytest.approx([p for _, p in page.probabilities], abs=1e-3)
    heat_url = server + f"/heat/{slide_id}.png?q=papillary"
    mine, served = (Image.open(io.BytesIO(png)) for png in (state.heat_png(slide_id, "papillary")[0], get(heat_url)[2]))
    assert mine.size == served.size and np.abs(np.asarray(mine, float) - np.asarray(served, float)).mean() < 1


def test_vendored_viewer_ships_with_its_licence() -> None:
    folder = REPO / "vlm" / "serve" / "static" / "openseadragon"
    assert "Redistribution and use in source and binary forms" in (folder / "LICENSE.txt").read_text()
    assert (folder / "openseadragon.min.js").stat().st_size > 100_000


def test_remote_host_needs_an_explicit_flag(site: dict, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["serve", "--index", str(site["index"]), "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in caplog.text


# --- in a real browser ------------------------------------------------------------------------------------


class Browser:
    """Headless Chromium over the DevTools Protocol: navigate, evaluate, screenshot, collect errors."""

    def __init__(self, profile: Path) -> None:
        from websockets.sync.client import connect

        executable = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if executable is None:
            # CI must run the browser tests (it fails without a browser); elsewhere they skip, saying why
            message = "no Chromium on PATH: `make install` installs it where it can (Debian: apt-get install chromium)"
            if os.environ.get("CI", "").lower() not in ("", "0", "false"):
                pytest.fail(message)
            pytest.skip(message)
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 60
        while (line := self.process.stderr.readline()) and "DevTools listening on" not in line:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port")
        port = int(re.search(r"ws://[^:]+:(\d+)/", line).group(1))
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.stack = contextlib.ExitStack()
        self.socket = self.stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20))
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def wait_for(self, expression: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied {expression!r}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions, error log entries (failed loads) and HTTP >= 400 responses."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(f"console: {[a.get('value', a.get('description')) for a in params['args']]}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
            elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
                found.append(f"HTTP {params['response']['status']}: {params['response']['url']}")
        return found

    def responses(self, pattern: str) -> list[int]:
        return [
            e["params"]["response"]["status"]
            for e in self.events
            if e.get("method") == "Network.responseReceived" and re.search(pattern, e["params"]["response"]["url"])
        ]

    def close(self) -> None:
        self.stack.close()
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    opened = Browser(tmp_path / "profile")
    try:
        yield opened
    finally:
        opened.close()


@pytest.mark.slow
def test_in_chromium_search_and_slide_pages_render_load_tiles_without_errors(
    server: str, site: dict, browser: Browser, tmp_path: Path
) -> None:
    browser.open(server + "/?q=" + urllib.parse.quote("papillary fronds"))
    ids = browser.evaluate("Array.from(document.querySelectorAll('#results li.result')).map(e => e.dataset.slideId)")
    assert sorted(ids) == sorted(site["ids"])
    browser.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    browser.screenshot(tmp_path / "search.png")

    slide_id = site["ids"][0]
    browser.open(server + f"/slide/{slide_id}?q=papillary")
    browser.wait_for("Number(document.body.dataset.tilesLoaded || 0) >= 1 && document.body.dataset.heatLoaded")
    time.sleep(1.0)  # let the remaining visible tiles arrive before the screenshot
    browser.screenshot(tmp_path / "slide.png")
    assert browser.evaluate("document.body.dataset.tilesFailed") is None
    assert browser.evaluate("document.querySelector('#slide-title').textContent") == slide_id
    assert browser.evaluate("document.querySelectorAll('#zeroshot tr').length") == 3
    tiles = browser.responses(rf"/dzi/{re.escape(slide_id)}_files/\d+/\d+_\d+\.jpeg")
    assert tiles and all(status == 200 for status in tiles)
    assert browser.responses(r"/heat/") == [200]
    assert browser.errors() == []
    for name in ("search.png", "slide.png"):
        assert (tmp_path / name).stat().st_size > 5_000


@pytest.mark.slow
def test_demo_index_pages_and_heat(demo_out: Path) -> None:  # noqa: F811
    """On the demo: ranks continue across pages, and a slide page computes its heat with the rebuilt encoder."""
    with running_server(["--index", str(demo_out / "index"), "--slides", str(demo_out / "slides"), "--features",
                         str(demo_out / "features"), "--task", str(TASK)]) as base:
        ranks, ids = [], []
        for page_no in (1, 2):
            html = get(base + f"/?q=papillary+fronds&page_no={page_no}")[2].decode()
            ranks += [int(r) for r in re.findall(r"<strong>#(\d+)</strong>", html)]
            ids += re.findall(r'class="result" data-slide-id="([^"]+)"', html)
        indexed = len(pd.read_parquet(demo_out / "index" / "metadata.parquet"))  # the held-out slides
        assert 10 < indexed <= 20  # so that the second page is partly filled
        assert ranks == list(range(1, indexed + 1)) and len(set(ids)) == indexed
        status, _, body = get(base + "/slide/papillary-10?q=" + urllib.parse.quote("a tumour with fronds"))
        assert status == 200 and 'id="heat-toggle"' in body.decode() and 'id="zeroshot"' in body.decode()


# --- Host header, port, files that go away after start ------------------------------------------------------


def raw_get(base: str, path: str, host_header: str) -> tuple[int, bytes]:
    """A real HTTP request to the server at `base` carrying `host_header` as its Host (what DNS rebinding sends)."""
    import http.client

    address = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.putrequest("GET", path, skip_host=True)
        connection.putheader("Host", host_header)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_foreign_host_header_is_refused(server: str) -> None:
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends `Host: evil.example`."""
    port = urllib.parse.urlsplit(server).port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.:80"):
        status, body = raw_get(server, "/api/search?q=papillary", host)
        assert status == 400 and b"slide_id" not in body, host
    assert raw_get(server, "/thumb/synthetic_05.png", "evil.example")[0] == 400
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", "127.0.0.1"):
        status, body = raw_get(server, "/api/search?q=papillary", host)
        assert status == 200 and b"slide_id" in body, host


def test_a_bad_port_fails_before_anything_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The index does not exist: a port error first means the port was checked before loading."""
    for port in ("-1", "70000"):
        caplog.clear()
        assert main(["serve", "--index", str(tmp_path / "no-index"), "--port", port]) == 2
        assert f"--port {port} is not a TCP port: give 0–65535" in caplog.text
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        caplog.clear()
        assert main(["serve", "--index", str(tmp_path / "no-index"), "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1 port" in caplog.text and "choose another --port" in caplog.text


def test_moved_truncated_or_foreign_files_answer_410_and_serving_goes_on(site: dict, tmp_path: Path) -> None:
    """Files broken after start-up; also: --port 0 prints the bound port, and --host names an accepted Host."""
    slides, features = tmp_path / "slides", tmp_path / "features"
    slides.mkdir()
    shutil.copytree(site["root"] / "features", features)
    for slide_id in site["ids"]:
        shutil.copy(site["slides"] / f"{slide_id}.tiff", slides)
    a, b = sorted(site["ids"])
    output: list[str] = []
    args = ["--index", str(site["index"]), "--slides", str(slides), "--features", str(features), "--task", str(TASK)]
    with running_server([*args, "--allow-remote"], host="127.0.0.2", port=0, output=output) as base:
        assert urllib.parse.urlsplit(base).port not in (0, None)
        assert raw_get(base, "/api/search?q=x", "127.0.0.2")[0] == 200
        assert raw_get(base, "/api/search?q=x", "localhost")[0] == 200
        assert raw_get(base, "/api/search?q=x", "evil.example")[0] == 400
        assert get(base + f"/dzi/{b}_files/0/0_0.jpeg")[0] == 200  # b is open (and its small level cached) before
        # its file is cut: what OpenSlide still holds may be served, any read of the file answers 410
        (slides / f"{a}.tiff").rename(tmp_path / "moved.tiff")
        with open(slides / f"{b}.tiff", "r+b") as cut:
            cut.truncate(4096)
        (features / f"{a}.h5").write_bytes(b"not an HDF5 file" * 64)
        for path, name in [(f"/thumb/{a}.png", f"{a}.tiff"), (f"/dzi/{a}.dzi", f"{a}.tiff"),
                           (f"/dzi/{b}_files/11/1_1.jpeg", f"{b}.tiff"), (f"/dzi/{b}_files/11/2_1.jpeg", f"{b}.tiff"),
                           (f"/heat/{a}.png?q=papillary", f"{a}.h5")]:
            status, kind, body = get(base + path)
            assert status == 410, (path, status, body[:300])
            assert name.encode() in body and b"can no longer be read" in body, path
        status, _, body = get(base + f"/slide/{a}?q=papillary")
        assert status == 200 and f"{a}.h5 can no longer be read" in body.decode()
        status, _, body = get(base + "/api/search?q=papillary")
        assert status == 200 and sorted(r["slide_id"] for r in json.loads(body)) == sorted(site["ids"])
        (tmp_path / "moved.tiff").rename(slides / f"{a}.tiff")  # restored: served again
        assert get(base + f"/dzi/{a}.dzi")[0] == 200
    assert "Traceback" not in output[0] and "Internal Server Error" not in output[0]
