"""The committed slide figures (docs/figures) show what today's code gives: their data,
rebuilt from the project's functions, equals the JSON saved beside each picture."""
import json
import os

import pytest

import figures


@pytest.fixture(scope="module")
def today():
    return json.loads(json.dumps(figures.figure_data()))  # as the JSON file holds it (tuples -> lists)


@pytest.mark.parametrize("name", list(figures.DRAW))
def test_committed_figure_shows_todays_data(today, name):
    path = os.path.join(figures.OUT, f"{name}.json")
    for ext in ("json", "svg", "png"):
        assert os.path.exists(os.path.join(figures.OUT, f"{name}.{ext}")), f"docs/figures/{name}.{ext} is missing"
    with open(path) as f:
        committed = json.load(f)
    assert committed == today[name], (
        f"docs/figures/{name}.* no longer show what the code gives (a mask, a cost or the decoder's "
        f"wiring changed): run `python figures.py` and look at the new pictures")


def test_figure_data_is_the_projects_own(today):
    """Spot checks that the data says what the figures claim, from the functions themselves."""
    m = today["masks"]["masks"]
    L = len(m["AR"]["queries"])
    bd3 = m["BD3-LM"]["mask"]
    # BD3-LM's mask is E2D2's two masks stacked: the encoder's beside zeros, over the decoder's
    assert [row[:L] for row in bd3[:L]] == m["E2D2 encoder"]["mask"]
    assert all(not any(row[L:]) for row in bd3[:L])
    assert bd3[L:] == m["E2D2 decoder"]["mask"]
    # the shared-KV decoder reads the top (or bottom) encoder layers' keys/values; hidden reads h
    cross = {v: [e[0] for e in d["edges"] if e[1].startswith("dec") and e[0] not in ("x_t",) and not e[0].startswith("dec")]
             for v, d in today["architecture"].items()}
    n_enc, n_dec = figures.ARCH_ENC, figures.ARCH_DEC
    assert cross == {"hidden": ["h"] * n_dec, "shared_kv, top": [f"enc {n_enc - n_dec + j}" for j in range(1, n_dec + 1)],
                     "shared_kv, bottom": [f"enc {j}" for j in range(1, n_dec + 1)]}
    # per generated token at T = B: AR pays N calls, E2D2 fewer than BD3-LM
    c = today["sampling_cost"]["against_T"]
    assert c["AR"]["layer_calls"] == [figures.COST["n_enc"]] * len(c["T"])
    assert all(e < b for e, b in zip(c["E2D2"]["layer_calls"], c["BD3-LM"]["layer_calls"]))


@pytest.mark.slow
def test_python_figures_draws_every_figure(tmp_path):
    """The one command draws all three (SVG and PNG) and writes the same data as committed."""
    figures.write(str(tmp_path))
    for name in figures.DRAW:
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000 and (tmp_path / f"{name}.svg").stat().st_size > 10_000
        assert (tmp_path / f"{name}.json").read_text() == open(os.path.join(figures.OUT, f"{name}.json")).read()
