"""The race (race.py, sample.py --race, bench.py race): the recorder against the sampler it
records, and the page in a real browser (headless Chromium, marked slow)."""
import fcntl
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time

import pytest
import torch

import data
import race
import sample
from conftest import SMALL, run, script_error, tiny
from e2d2 import generate, left_pad
from models import MODELS

PROMPTS = ["12+34=", "905+7=", "1+1="]
A = 8  # answer tokens: two blocks of 4 for E2D2 and BD3-LM


def vivid(name: str):
    """A tiny model whose weights are drawn larger than at initialisation: its answers change
    from position to position (a freshly initialised tiny model writes one token everywhere,
    which would hide a page that shows tokens in the wrong places)."""
    model = tiny(name)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 3 / p.shape[1] ** 0.5)
        model.embed.weight.normal_(0, 1)
    return model


def race_of(models, **sampling):
    """run_race over tiny random models, one per type, on PROMPTS."""
    tok = data.ByteTokenizer()
    return race.run_race([(race.LANES[m.cfg.model]["name"], m) for m in models], [tok.encode(p) for p in PROMPTS],
                         tok, "cpu", repeats=1, **sampling)


def test_every_model_has_a_lane():
    """A model added to the registry must say what its lane is and what its calls run."""
    assert set(race.LANES) == set(MODELS)


def test_the_recording_is_the_generation(tmp_path):
    """The recorded tokens are generate()'s; the calls are timed in order within the total;
    the layer calls are the registry's count; the page is self-contained and small."""
    models = [vivid(name) for name in MODELS]
    sampling = dict(max_new_tokens=A, stop_at_eos=False)
    result = race_of(models, **sampling)
    tok = data.ByteTokenizer()
    for model, lane in zip(models, result["lanes"]):
        out = generate(model, [tok.encode(p) for p in PROMPTS], generator=torch.Generator().manual_seed(0), **sampling)
        assert lane["tokens"] == out.tokens, lane["name"]
        # the tokens the steps revealed, position by position, are the answer
        revealed = [[None] * A for _ in PROMPTS]
        for t, block, rows, reveal in lane["steps"]:
            for row, pos, token, p in reveal:
                assert revealed[row][pos] is None and 0 <= p <= 1  # revealed once, with its probability
                revealed[row][pos] = token
        assert revealed == out.tokens, lane["name"]
        assert lane["denoising_calls"] == out.network_calls and lane["network_calls"] == len(lane["calls"])
        # calls in order, never overlapping, inside [0, total]; the steps' times in order
        ends = [0.0] + [x for c in lane["calls"] for x in c[:2]] + [lane["total_ms"]]
        assert ends == sorted(ends), lane["name"]
        assert [s[0] for s in lane["steps"]] == sorted(s[0] for s in lane["steps"])
        assert 0 < lane["calls_ms"] <= lane["total_ms"]
        # every network call is a timed call (E2D2 and BD3-LM also time their prompt and blocks)
        kinds = [c[2] for c in lane["calls"]]
        assert kinds.count(race.LANES[model.cfg.model]["logits"]) >= out.network_calls
        cfg = model.cfg
        P = left_pad([tok.encode(p) for p in PROMPTS], cfg.block_len, cfg.pad_id).shape[1]
        _, layer_calls = MODELS[cfg.model].sampling_cost(cfg, MODELS[cfg.model].has_cache, P, A, cfg.block_len,
                                                         cfg.block_len)
        assert lane["layer_calls"] == layer_calls, lane["name"]
        # the figure the page's caption gives: the recorded total against the same generation
        # without the recorder (timing on a shared machine: printed, not asserted)
        print(f"{lane['name']}: recorded {lane['total_ms']:.2f} ms, without the recorder {lane['plain_ms']:.2f} ms, "
              f"network calls {lane['calls_ms'] / lane['total_ms']:.0%} of it")
    path = tmp_path / "race.html"
    size = race.write_page(result, str(path))
    page = path.read_text()
    assert size == len(page.encode()) < 100_000  # kilobytes, not megabytes
    assert not re.search(r"https?:|//[a-z]|<link|src=|@import|url\(", page)  # nothing to fetch
    inline = re.search(r'<script type="application/json" id="race-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(inline)["lanes"][0]["tokens"] == result["lanes"][0]["tokens"]


def test_race_flags(capsys, tmp_path):
    """Several --ckpt are for --race; --race does not mix with --eval or --show."""
    err = script_error(sample.main, ["--ckpt=a.pt", "--ckpt=b.pt", "1+1="], capsys)
    assert "several --ckpt are for --race" in err
    err = script_error(sample.main, ["--race=r.html", "--eval=x.jsonl"], capsys)
    assert "leave out --eval and --show" in err
    err = script_error(sample.main, ["--race=r.html", "--repeats=0"], capsys)
    assert "--repeats=0 must be >= 1" in err


@pytest.mark.slow
def test_bench_race_from_nothing(tmp_path):
    """bench.py race trains the four models (here tiny, 2 steps), writes the page; run again
    it reuses them; training flags for runs that exist are refused."""
    page, runs = tmp_path / "race.html", tmp_path / "runs"
    r = run("bench.py", "race", f"--out={page}", f"--out_dir={runs}", "--repeats=1", "--threads=1", "--digits=2",
            "--max_steps=2", "--eval_every=2", "--batch_size=8", *SMALL)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(runs)) == sorted(MODELS) and page.stat().st_size > 0
    assert "wrote" in r.stdout and "=== e2d2 ===" in r.stdout
    page.unlink()
    r = run("bench.py", "race", f"--out={page}", f"--out_dir={runs}", "--repeats=1", "--threads=1")
    assert r.returncode == 0 and "===" not in r.stdout and page.stat().st_size > 0, r.stderr
    r = run("bench.py", "race", f"--out={page}", f"--out_dir={runs}", "--max_steps=3")
    assert r.returncode != 0 and "would not apply to them" in r.stderr


# ---------------------------------------------------------------------------------------
# The page in a real browser: headless Chromium, driven over the DevTools protocol on a pipe
# (--remote-debugging-pipe: JSON messages ending in a NUL byte, commands on the browser's
# file descriptor 3, replies and events on 4), with the standard library alone.
# ---------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-pipe"]


class Browser:
    def __init__(self, exe: str, profile: str):
        cmd_r, cmd_w = os.pipe()
        ev_r, ev_w = os.pipe()
        # copies numbered above 4 (the lowest free ones), so that moving them to 3 and 4 in the
        # browser's process clobbers neither
        cmd_r2, ev_w2 = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 5), fcntl.fcntl(ev_w, fcntl.F_DUPFD, 5)

        def fds_3_and_4():
            os.dup2(cmd_r2, 3)
            os.dup2(ev_w2, 4)

        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=fds_3_and_4, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for fd in (cmd_r, ev_w, cmd_r2, ev_w2):  # the browser's ends
            os.close(fd)
        self.out, self.inbox, self.events, self.next_id = cmd_w, queue.Queue(), [], 0
        threading.Thread(target=self.read, args=(ev_r,), daemon=True).start()

    def read(self, fd):
        buf = b""
        while chunk := os.read(fd, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for m in messages:
                self.inbox.put(json.loads(m))

    def send(self, method: str, session: str = None, timeout: float = 60, **params):
        """One command; its result. Events that arrive meanwhile are kept in self.events."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            m = self.inbox.get(timeout=max(deadline - time.time(), 0.01))
            if m.get("id") == self.next_id:
                assert "error" not in m, m
                return m["result"]
            self.events.append(m)

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI") == "true":  # CI installs it (.ci/run): missing there is a failure
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium) to open the page in")
    return exe


# What the page shows, read from its DOM: each lane's tokens (cell by cell, up to the first
# [EOS]; a [MASK] or an empty cell before it means unfinished), its rank, the finish order.
READ_PAGE = """JSON.stringify([...document.querySelectorAll('.lane')].map(lane => ({
  name: lane.dataset.lane, rank: lane.dataset.rank,
  rows: [...lane.querySelectorAll('.row')].map(row => {
    const toks = [];
    for (const c of row.querySelectorAll('.cell')) {
      if (c.classList.contains('eos')) return toks;
      if (!c.classList.contains('tok')) return toks.concat(['unfinished']);
      toks.push(Number(c.dataset.tok));
    }
    return toks; })})))"""


def open_page(path: str, slow: int, timeout: float = 60) -> tuple:
    """Open the page at `slow` x real time, wait until it says every lane finished (or the
    timeout), and return (what READ_PAGE reads, the requests it made, the errors it logged)."""
    browser = Browser(chromium(), os.path.join(os.path.dirname(path), "profile"))
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session)
        url = f"file://{path}"
        browser.send("Page.navigate", session, url=f"{url}#slow={slow}")
        deadline, done = time.time() + timeout, False
        while not done and time.time() < deadline:
            time.sleep(0.2)
            done = browser.send("Runtime.evaluate", session, expression="document.body && document.body.dataset.done",
                                returnByValue=True)["result"].get("value") == "1"
        shown = json.loads(browser.send("Runtime.evaluate", session, expression=READ_PAGE,
                                        returnByValue=True)["result"]["value"])
        events = browser.events
        requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
        errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        return shown, [u for u in requests if u.split("#")[0] != url], errors
    finally:
        browser.close()


@pytest.mark.slow
def test_the_page_in_a_browser(tmp_path):
    """The page replays every lane to the sampler's tokens, the lanes finish in the order of
    their recorded times, and it fetches nothing and logs no error."""
    models = [vivid(name) for name in MODELS]
    result = race_of(models)
    tok = data.ByteTokenizer()
    path = str(tmp_path / "race.html")
    race.write_page(result, path)
    end = max(lane["total_ms"] for lane in result["lanes"])
    shown, requests, errors = open_page(path, slow=max(1, int(3000 / end)))  # about 3 s
    assert requests == [] and errors == []
    assert [lane["name"] for lane in shown] == [lane["name"] for lane in result["lanes"]]
    for model, lane, page in zip(models, result["lanes"], shown):
        out = generate(model, [tok.encode(p) for p in PROMPTS], generator=torch.Generator().manual_seed(0))
        assert page["rows"] == out.tokens, f"{lane['name']}: the page shows other tokens than the sampler's"
    by_time = sorted(range(len(shown)), key=lambda i: result["lanes"][i]["total_ms"])
    assert [shown[i]["rank"] for i in by_time] == [str(r + 1) for r in range(len(shown))], \
        "the lanes did not finish in the order of their recorded times"
