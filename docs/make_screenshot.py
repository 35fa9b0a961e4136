"""Screenshot TensorBoard of a finished run for the docs: the first screen a user gets (the Time Series view as it
opens, nothing chosen), above a prediction/label slice. --check only checks that first screen shows the loss charts."""
import argparse
import base64
import io
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# (hash, viewport height) at 1600 pixels wide: the default view, as it opens; then the Text dashboard's slices (they
# scroll inside their boxes, so a fixed size).
PAGES = [("", 900), ("#text&tagFilter=slices%2F", 1310)]
FIRST_SCREEN = ("loss/text", "loss/audio")  # what the first screen must show
# The Time Series cards drawn inside the window: their titles are tb-truncated-path elements of class "tag".
VISIBLE_CARDS = ("JSON.stringify(Array.from(document.querySelectorAll('tb-truncated-path.tag'))"
                 ".filter(e => e.getBoundingClientRect().top < window.innerHeight).map(e => e.textContent.trim()))")
WIDTH = 1600


class Browser:
    """Headless Chromium over --remote-debugging-pipe (DevTools JSON, no websocket): the CLI's --screenshot can't set
    localStorage, where TensorBoard keeps 'ignore outliers in chart scaling' (on, it crops the curves' steep start)."""

    def __init__(self, profile: str):
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={WIDTH},{PAGES[0][1]}",
                 "--remote-debugging-pipe", "about:blank"]
        # the pipe wants fds 3 (commands in) and 4 (answers out): sh moves our stdin and stdout pipes there
        self.proc = subprocess.Popen(["sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', "sh", CHROMIUM,
                                      *flags], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, bufsize=0)
        self._buffer, self._id, self.session = b"", 0, None

    def attach(self):  # to the tab it opened on about:blank
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, **params):
        self._id += 1
        session = {"sessionId": self.session} if self.session else {}  # none: to the browser itself
        message = {"id": self._id, "method": method, "params": params, **session}
        self.proc.stdin.write(json.dumps(message).encode() + b"\0")
        while True:  # events come in between; skip them until our answer
            while b"\0" not in self._buffer:
                chunk = self.proc.stdout.read(1 << 20)
                self._buffer += chunk if chunk else sys.exit("chromium quit")
            line, self._buffer = self._buffer.split(b"\0", 1)
            if (reply := json.loads(line)).get("id") == self._id:
                return reply["result"] if "error" not in reply else sys.exit(f"chromium: {method}: {reply['error']}")

    def shot(self, url: str, settle: float, height: int = PAGES[0][1]) -> bytes:
        # the page's viewport itself: headless gives the page less than --window-size's height
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        time.sleep(settle)  # TensorBoard fetches and draws after load; on localhost a few seconds is plenty
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self):
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, SystemExit, subprocess.TimeoutExpired):  # it hangs or died: then the hard way
            self.proc.kill(), self.proc.wait()


def wait_for_run(url: str, server: subprocess.Popen, log, slices: bool = True, timeout: float = 90):
    """Until TensorBoard answers and has read the run's loss scalars and slices (it loads event files lazily)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            log.seek(0)
            sys.exit(f"tensorboard quit: {log.read().decode()[-2000:]}")
        try:
            scalars, texts = (urllib.request.urlopen(f"{url}/data/plugin/{plugin}/tags", timeout=5).read()
                              for plugin in ("scalars", "text"))
            if b'"loss/' in scalars and (b'"slices/' in texts or not slices):
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"no loss/ scalars and slices/ texts at {url} after {timeout:.0f} s (train.slice_every > 0?)")


def main():
    parser = argparse.ArgumentParser(description=__doc__ + " Serves RUN_DIR/tensorboard on localhost, photographs "
                                     "its default view and its Text dashboard (slices/) with headless Chromium, "
                                     "stacks the two into one PNG and stops the server.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run's train.out_dir")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images" / "tensorboard_demo.png",
                        help="the PNG to write (default: docs/images/tensorboard_demo.png beside this script)")
    parser.add_argument("--check", action="store_true",
                        help="no PNG: print the charts the first screen shows, exit 1 unless they include "
                             f"{' and '.join(FIRST_SCREEN)} (default: off)")
    parser.add_argument("--port", type=int, default=6123, help="TensorBoard's port on localhost (default 6123)")
    parser.add_argument("--settle", type=float, default=4.0, help="seconds each page gets to draw (default 4)")
    args = parser.parse_args()
    logdir = args.run_dir / "tensorboard"
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} not found: apt-get install -y chromium")
    if not logdir.is_dir():
        sys.exit(f"{logdir} not found: is RUN_DIR a run's out_dir with train.tensorboard on?")
    from PIL import Image  # comes with matplotlib
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so that the finally below runs then too

    url = f"http://127.0.0.1:{args.port}"
    log = tempfile.TemporaryFile()  # not a pipe: nobody reads it while the server runs, so a pipe could fill up
    server = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(logdir),
                               "--host", "127.0.0.1", "--port", str(args.port)], stdout=log, stderr=log)
    pages = PAGES[:1] if args.check else PAGES
    try:
        wait_for_run(url, server, log, slices=not args.check)
        with tempfile.TemporaryDirectory() as profile:  # fresh profile: no settings or cache from earlier runs
            browser = Browser(profile)
            try:
                browser.attach()
                browser.shot(url + "/data/logdir", 1)  # the origin must be open to write its localStorage
                browser.call("Runtime.evaluate", expression="localStorage.setItem('_ignoreYOutliers', 'false')")
                shots = []
                for n, (page, height) in enumerate(pages):
                    shots.append(Image.open(io.BytesIO(browser.shot(f"{url}/{page}", args.settle, height))))
                    if n == 0:
                        shown = browser.call("Runtime.evaluate", expression=VISIBLE_CARDS)["result"]["value"]
                        cards = json.loads(shown)
            finally:
                browser.close()
        print(f"first screen: {', '.join(cards) or 'no chart'}")
        if not all(tag in cards for tag in FIRST_SCREEN):
            sys.exit(f"error: the first screen does not show {' and '.join(FIRST_SCREEN)}")
        if args.check:
            return
        image = Image.new("RGB", (WIDTH, sum(s.height for s in shots)), "white")
        for i, shot in enumerate(shots):  # stacked: the first screen above the slices
            image.paste(shot, (0, sum(s.height for s in shots[:i])))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        image.save(args.out, optimize=True)
        print(f"wrote {args.out} ({image.width}x{image.height})")
    finally:  # never leave the server behind, also on errors
        server.kill(), server.wait()


if __name__ == "__main__":
    main()
