"""
The slide figures, drawn from the project's own code:

    python figures.py            # writes docs/figures/{architecture,masks,sampling_cost}.{svg,png,json}
    python figures.py --out=DIR  # somewhere else

  architecture   E2D2's two stacks and which keys/values each decoder layer reads, for the
                 "hidden" decoder and the "shared_kv" one (paired with the top or the bottom
                 encoder layers). The edges are read off a real (tiny) E2D2Network: what its
                 clean_kv hands each decoder layer.
  masks          the attention masks of AR, MDLM, BD3-LM and E2D2 (encoder, decoder) on one
                 addition example, every token labelled, each built by the mask function that
                 model trains with (e2d2.encoder_mask, decoder_mask, bd3lm_mask;
                 baselines.causal_mask, full_mask).
  sampling_cost  layer calls per generated token of the four cached samplers against T (steps
                 per block) and against N_dec, from models.sampling_cost (the registry's counts,
                 which tests check against hooks on the real layers).

Beside each picture, a JSON file holds the data it shows (masks as 0/1 lists, the curves'
numbers, the diagram's edges); tests/test_figures.py rebuilds that data from today's code and
checks it against the committed files, so a change that alters a figure fails until the
figures are drawn again with this command.
"""

import argparse
import json
import os

import torch

import data
from baselines import causal_mask, full_mask
from e2d2 import ModelConfig, bd3lm_mask, decoder_mask, encoder_mask
from models import MODELS, build_model, sampling_cost

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "figures")

# ---------------------------------------------------------------------------------------
# The data of each figure (no drawing): what the test compares with the committed JSON.
# ---------------------------------------------------------------------------------------

# the diagram's model: N_enc = 6, N_dec = 2, in the three ways a decoder can read the clean tokens
ARCH_ENC, ARCH_DEC = 6, 2
ARCH_VARIANTS = {"hidden": dict(decoder="hidden", decoder_layers="top"),
                 "shared_kv, top": dict(decoder="shared_kv", decoder_layers="top"),
                 "shared_kv, bottom": dict(decoder="shared_kv", decoder_layers="bottom")}


@torch.no_grad()
def architecture_data() -> dict:
    """Per variant, the diagram's edges (source, target, label). The edges into each decoder
    layer are found by running the code: a tiny E2D2Network encodes a clean sequence, and
    clean_kv says what decoder layer j reads: one of the encoder's own per-layer keys/values
    (shared_kv: found by identity) or new ones projected from h (hidden)."""
    out = {}
    for name, over in ARCH_VARIANTS.items():
        cfg = ModelConfig(n_enc=ARCH_ENC, n_dec=ARCH_DEC, d_model=8, n_heads=2, block_len=2, seq_len=4, **over)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        x0 = torch.zeros(1, 4, dtype=torch.long)
        mask = torch.ones(1, 4, 4, dtype=torch.bool)
        h, enc_kv = model.encode(x0, slice(0, 4), mask)
        clean = model.clean_kv(h, slice(0, 4), enc_kv)  # what each decoder layer reads of the clean tokens
        edges = [["x_0", "enc 1", ""]] + [[f"enc {i}", f"enc {i + 1}", ""] for i in range(1, ARCH_ENC)]
        edges += [[f"enc {ARCH_ENC}", "h", "norm"], ["x_t", "dec 1", ""]]
        edges += [[f"dec {j}", f"dec {j + 1}", ""] for j in range(1, ARCH_DEC)] + [[f"dec {ARCH_DEC}", "logits", "head"]]
        for j, kv in enumerate(clean):
            same = [i for i, e in enumerate(enc_kv) if kv is e]  # shared_kv: the encoder layer's own K/V
            edges.append([f"enc {same[0] + 1}", f"dec {j + 1}", "K, V"] if same else ["h", f"dec {j + 1}", "W_K, W_V"])
        out[name] = {"config": {"n_enc": ARCH_ENC, "n_dec": ARCH_DEC, **over}, "edges": edges}
    return out


# the masks' example: an addition prompt and its answer, blocks of 2 (3 prompt blocks, 2 answer
# blocks: the answer, then [EOS] to its block's end), laid out by data.collate as training does
MASK_PROMPT, MASK_ANSWER, MASK_B = "12+34=", "46", 2
MASK_NOISY = "46_$"  # one x_t of the answer (the masks do not depend on which tokens are [MASK])


def masks_data() -> dict:
    """Every model's training mask on the example, as 0/1 rows (queries) of columns (keys),
    with the token of each row and column: clean x_0 (or h, its encoding) and noisy x_t."""
    tok = data.ByteTokenizer()
    batch = data.collate([(tok.encode(MASK_PROMPT), tok.encode(MASK_ANSWER))], MASK_B, 64)
    x0, prompt = batch.x0, batch.prompt_mask  # (1, L)
    valid = x0 != tok.pad_id
    clean = list(tok.decode(x0[0].tolist(), eos_char="$"))
    if len(clean) != x0.shape[1]:
        raise ValueError("every token of the mask example must be one character")
    noisy = clean[:int(prompt.sum())] + list(MASK_NOISY)  # the prompt is never noised
    masks = {  # name -> (mask, query labels, key labels, key groups: label of each group, its width)
        "AR": (causal_mask(valid), clean, clean, [["x_0", len(clean)]]),
        "MDLM": (full_mask(valid), noisy, noisy, [["x_t", len(noisy)]]),  # MDLM reads x_t alone
        "BD3-LM": (bd3lm_mask(prompt, valid, MASK_B), clean + noisy, clean + noisy,
                   [["x_0", len(clean)], ["x_t", len(noisy)]]),
        "E2D2 encoder": (encoder_mask(prompt, valid, MASK_B), clean, clean, [["x_0", len(clean)]]),
        "E2D2 decoder": (decoder_mask(valid, MASK_B), noisy, clean + noisy,
                         [["h (of x_0)", len(clean)], ["x_t", len(noisy)]]),
    }
    return {"example": {"prompt": MASK_PROMPT, "answer": MASK_ANSWER, "x_t answer": MASK_NOISY, "block_len": MASK_B,
                        "prompt_len": int(prompt.sum())},
            "masks": {name: {"queries": q, "keys": k, "key_groups": g, "mask": m[0].int().tolist()}
                      for name, (m, q, k, g) in masks.items()}}


# the cost curves' sizes: those of `bench.py sample` (prompt 16, answer 128, N = N_enc = 12, B = 8)
COST = dict(P=16, A=128, B=8, n_enc=12, n_dec=2, T=8, small_ar=4)


def cost_data() -> dict:
    """Layer calls per generated token of every cached sampler (MDLM has no cache), at the
    sizes above: against T = 1..B with N_dec fixed, and against N_dec = 1..N_enc with T = B.
    Layer-token passes beside them (the compute-bound count). The AR's cost does not depend
    on T or N_dec; a small AR (N = 4) is drawn too: the models of docs/finetuning.md."""
    c = COST
    runs = {"AR": ("ar", c["n_enc"]), f"AR (N = {c['small_ar']})": ("ar", c["small_ar"]),
            "MDLM": ("mdlm", c["n_enc"]), "BD3-LM": ("bd3lm", c["n_enc"]), "E2D2": ("e2d2", c["n_enc"])}

    def cost(model, n, T, n_dec):
        return sampling_cost(model, MODELS[model].has_cache, c["P"], c["A"], c["B"], T, n, n_dec)
    Ts, n_decs = list(range(1, c["B"] + 1)), list(range(1, c["n_enc"] + 1))
    out = {"sizes": c, "against_T": {"T": Ts}, "against_n_dec": {"n_dec": n_decs}}
    for label, (model, n) in runs.items():
        along_T = [cost(model, n, T, c["n_dec"]) for T in Ts]
        along_d = [cost(model, n, c["T"], d) for d in n_decs]
        out["against_T"][label] = {"layer_calls": [k for _, k in along_T], "layer_tokens": [t for t, _ in along_T]}
        out["against_n_dec"][label] = {"layer_calls": [k for _, k in along_d], "layer_tokens": [t for t, _ in along_d]}
    return out


def figure_data() -> dict:
    """name -> the data of that figure (what its JSON file holds)."""
    return {"architecture": architecture_data(), "masks": masks_data(), "sampling_cost": cost_data()}


# ---------------------------------------------------------------------------------------
# Drawing (matplotlib): one function per figure, from its data alone.
# ---------------------------------------------------------------------------------------

CLEAN, NOISY, CROSS = "#2b6cb0", "#c05621", "#2f855a"  # encoder / x_0, decoder / x_t, what crosses over


def draw_architecture(d: dict, plt):
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    fig, axes = plt.subplots(1, len(d), figsize=(5.6 * len(d), 6.8))
    xe, xd, w, bus = 1.5, 6.0, 2.8, 3.45  # encoder and decoder columns, box width, the x of h's line (hidden)
    for ax, (name, v) in zip(axes, d.items()):
        n_enc, n_dec = v["config"]["n_enc"], v["config"]["n_dec"]
        cross = [e for e in v["edges"] if e[1].startswith("dec") and not e[0].startswith(("dec", "x_t"))]
        # where each box sits: encoder layer i at height i; a decoder layer level with the encoder
        # layer whose keys/values it reads, or (reading h) with the top ones
        pos = {"x_0": (xe, 0), "h": (xe, n_enc + 1), **{f"enc {i}": (xe, i) for i in range(1, n_enc + 1)}}
        for src, dst, _ in cross:
            pos[dst] = (xd, pos[src][1] if src != "h" else n_enc - n_dec + int(dst.split()[1]))
        heights = [pos[f"dec {j}"][1] for j in range(1, n_dec + 1)]
        pos["x_t"], pos["logits"] = (xd, min(heights) - 1), (xd, max(heights) + 1)
        text = {"x_0": "clean tokens $x_0$", "x_t": "noisy tokens $x_t$", "h": "$h$ = norm(last layer)",
                "logits": "logits (SUBS)"}
        for node, (x, y) in pos.items():
            color = CLEAN if node.startswith("enc") or node in ("x_0", "h") else NOISY
            layer = node.startswith(("enc", "dec"))
            label = (f"encoder layer {node.split()[1]}" if node.startswith("enc") else
                     f"decoder layer {node.split()[1]}" if node.startswith("dec") else text[node])
            ax.add_patch(FancyBboxPatch((x - w / 2, y - 0.3), w, 0.6, boxstyle="round,pad=0.02,rounding_size=0.12",
                                        fc=color if layer else "white", ec=color, lw=1.5, alpha=0.9 if layer else 1))
            ax.text(x, y, label, ha="center", va="center", fontsize=11, color="white" if layer else color,
                    fontweight="bold" if layer else "normal")
        for src, dst, label in v["edges"]:
            (x1, y1), (x2, y2) = pos[src], pos[dst]
            if [src, dst, label] not in cross:  # up a stack
                ax.add_patch(FancyArrowPatch((x1, y1 + 0.3), (x2, y2 - 0.3), arrowstyle="-|>", mutation_scale=12,
                                             color="0.35", lw=1.2))
                continue
            start = xe + w / 2
            if src == "h":  # h runs along a line beside the stacks; each decoder layer projects it itself
                ax.plot([start, bus, bus], [y1, y1, y2], color=CROSS, lw=2)
                start, label = bus, f"$W_{{K,V}}^{{({dst.split()[1]})}}\\,h$"
            else:  # the encoder layer's own keys/values, K_i and V_i
                label = f"$K_{{{src.split()[1]}}}, V_{{{src.split()[1]}}}$"
            ax.add_patch(FancyArrowPatch((start, y2), (xd - w / 2, y2), arrowstyle="-|>", mutation_scale=16,
                                         color=CROSS, lw=2, shrinkA=0))
            ax.text((start + xd - w / 2) / 2, y2 + 0.12, label, ha="center", va="bottom", fontsize=11,
                    color=CROSS, fontweight="bold")
        how = {"hidden": "each decoder layer projects $h$\nwith its OWN $W_K, W_V$",
               "shared_kv, top": "decoder layer $j$ reads the keys/values\nof encoder layer $N_{enc} - N_{dec} + j$",
               "shared_kv, bottom": "decoder layer $j$ reads the keys/values\nof encoder layer $j$"}[name]
        ax.set_title(f"decoder = {name}\n{how}", fontsize=13)
        ax.text(xe, -0.85, "ENCODER ($N_{enc}$ layers)", ha="center", fontsize=12, color=CLEAN, fontweight="bold")
        ax.text(xd, -0.85, "DECODER ($N_{dec}$ layers)", ha="center", fontsize=12, color=NOISY, fontweight="bold")
        ax.set_xlim(xe - w / 2 - 0.1, xd + w / 2 + 0.1)
        ax.set_ylim(-1.2, n_enc + 1.5)
        ax.axis("off")
    fig.suptitle(f"E2D2, $N_{{enc}}$ = {ARCH_ENC}, $N_{{dec}}$ = {ARCH_DEC}: the clean keys/values each decoder layer "
                 "reads (its queries are the noisy tokens)", fontsize=14)
    fig.tight_layout()
    return fig


def draw_masks(d: dict, plt):
    from matplotlib.colors import ListedColormap
    m = d["masks"]
    B, P = d["example"]["block_len"], d["example"]["prompt_len"]
    L = len(m["AR"]["queries"])
    # the L x L masks and E2D2's decoder (L x 2L) on the top row, BD3-LM's 2L x 2L below: one cell, one size
    fig = plt.figure(figsize=(17, 13))
    grid = fig.add_gridspec(2, 5, height_ratios=[L, 2 * L], width_ratios=[L, L, L, 2 * L, 0.1], hspace=0.25, wspace=0.3)
    places = {"AR": grid[0, 0], "MDLM": grid[0, 1], "E2D2 encoder": grid[0, 2], "E2D2 decoder": grid[0, 3],
              "BD3-LM": grid[1, 0:2]}
    titles = {"AR": "AR: causal", "MDLM": "MDLM: bidirectional\nover $x_t$",
              "E2D2 encoder": "E2D2 encoder: block-causal,\nthe prompt read whole",
              "E2D2 decoder": "E2D2 decoder: $x_t$ queries, keys [$h$ ; $x_t$]:\n"
                              "offset block-causal | block-diagonal",
              "BD3-LM": "BD3-LM: one network over [$x_0$ ; $x_t$]"}
    stream = {"x_0": "$x_0$", "x_t": "$x_t$", "h (of x_0)": "$h$ (of $x_0$)"}
    for name, place in places.items():
        ax = fig.add_subplot(place)
        v = m[name]
        ax.imshow(v["mask"], cmap=ListedColormap(["white", CLEAN]), vmin=0, vmax=1, interpolation="nearest")
        nq, nk = len(v["queries"]), len(v["keys"])
        ax.set_xticks(range(nk), v["keys"], fontsize=12, family="monospace")
        ax.set_yticks(range(nq), v["queries"], fontsize=12, family="monospace")
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
        # labels coloured by stream (clean x_0 or h: blue, noisy x_t: orange), the prompt's in bold
        for labels, n_clean in ((ax.get_yticklabels(), L if name == "BD3-LM" else 0 if name in ("MDLM", "E2D2 decoder") else L),
                                (ax.get_xticklabels(), 0 if name == "MDLM" else L)):
            for i, lab in enumerate(labels):
                lab.set_color(CLEAN if i < n_clean else NOISY)
                lab.set_fontweight("bold" if i % L < P else "normal")
        # thin lines between blocks, thick between the clean and the noisy halves
        for k in range(0, nk + 1, B):
            ax.axvline(k - 0.5, color="black" if k % L == 0 else "0.7", lw=2 if k % L == 0 else 0.7)
        for k in range(0, nq + 1, B):
            ax.axhline(k - 0.5, color="black" if k % L == 0 else "0.7", lw=2 if k % L == 0 else 0.7)
        x = -0.5
        for label, width in v["key_groups"]:  # which stream the keys are, under the matrix
            ax.text(x + width / 2, nq + 0.1, f"keys: {stream[label]}", ha="center", va="top", fontsize=12,
                    color=NOISY if label == "x_t" else CLEAN)
            x += width
        ax.set_title(titles[name], fontsize=13, pad=28)
    ex = d["example"]
    note = fig.add_subplot(grid[1, 2:4])
    note.axis("off")
    note.text(0.05, 0.95, f"Prompt \"{ex['prompt']}\", answer \"{ex['answer']}\" then [EOS] (\\$), blocks of B = {B},\n"
              f"as data.collate lays them out; one noisy draw $x_t$ of the answer:\n"
              f"\"{ex['x_t answer'].replace('$', chr(92) + '$')}\" (_ = [MASK]; the prompt is never noised).\n\n"
              "Rows: queries; columns: keys; filled: may attend.\n"
              "Blue labels: clean $x_0$ (or $h$); orange: noisy $x_t$; bold: the prompt.\n"
              "Thin lines: blocks; thick lines: clean | noisy.\n\n"
              "E2D2 is BD3-LM's mask cut in two: the clean rows never\n"
              "read a noisy key, so the encoder runs them alone ($L$\n"
              "tokens), and only the noisy rows (the decoder) need the\n"
              "$2L$ keys. Top rows of BD3-LM = the E2D2 encoder mask,\n"
              "bottom rows = the E2D2 decoder mask.\n\n"
              "A noisy query of block $k$ sees the clean blocks before $k$\n"
              "only (the offset): block $k$'s own clean tokens are the\n"
              "answer it is asked to predict. (The decoder's prompt rows\n"
              "are never targets: training ignores them.)",
              fontsize=13, va="top", linespacing=1.45, transform=note.transAxes)
    return fig


def draw_sampling_cost(d: dict, plt):
    c = d["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    style = {"MDLM": dict(color="0.6", lw=2), "BD3-LM": dict(color=CLEAN, lw=2.5), "E2D2": dict(color=NOISY, lw=3),
             "AR": dict(color="black", ls="--", lw=2), f"AR (N = {c['small_ar']})": dict(color="black", ls=":", lw=2)}
    for ax, key, xs, xlabel, fixed in [
            (axes[0], "against_T", "T", "T, denoising steps per block", f"$N_{{dec}}$ = {c['n_dec']}"),
            (axes[1], "against_n_dec", "n_dec", "$N_{dec}$, E2D2's decoder layers", f"T = {c['T']}")]:
        x = d[key][xs]
        for label, st in style.items():
            ax.plot(x, d[key][label]["layer_calls"], marker="o", ms=4, label=label, **st)
        ax.set_xlabel(xlabel, fontsize=13)
        ax.set_ylabel("layer calls per generated token", fontsize=13)
        ax.set_ylim(0, 15)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=12)
        ax.set_title(f"against {xlabel.split(',')[0]} ({fixed})", fontsize=13)
    here = d["against_T"]["E2D2"]["layer_calls"][d["against_T"]["T"].index(c["T"])]
    axes[0].annotate(f"bench.py sample: {here:g}", (c["T"], here), (c["T"] - 3.2, here - 2.2), fontsize=12,
                     color=NOISY, arrowprops=dict(arrowstyle="->", color=NOISY))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=12, frameon=False)
    fig.suptitle(f"What each cached sampler pays per generated token (MDLM cannot cache): prompt {c['P']}, answer "
                 f"{c['A']}, B = {c['B']},\nN = $N_{{enc}}$ = {c['n_enc']} layers; the AR needs N calls per token "
                 "whatever T (models.sampling_cost)", fontsize=13)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


DRAW = {"architecture": draw_architecture, "masks": draw_masks, "sampling_cost": draw_sampling_cost}


def write(out: str = OUT, draw: bool = True) -> dict:
    """Write every figure's JSON (and, with draw, its SVG and PNG) into out; returns the data."""
    os.makedirs(out, exist_ok=True)
    figs = figure_data()
    if draw:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.rcParams["svg.hashsalt"] = "e2d2"  # the same SVG ids at every run: a redraw changes no byte
    for name, d in figs.items():
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(d, f, indent=1)
            f.write("\n")
        if draw:
            fig = DRAW[name](d, plt)
            fig.savefig(os.path.join(out, f"{name}.png"), dpi=110, bbox_inches="tight")
            fig.savefig(os.path.join(out, f"{name}.svg"), bbox_inches="tight", metadata={"Date": None})
            plt.close(fig)
    return figs


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=OUT, help="the folder the figures go to (default docs/figures)")
    args = p.parse_args()
    write(args.out)
    print(f"wrote {', '.join(DRAW)} (.svg, .png, .json) to {args.out}")
