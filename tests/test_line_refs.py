"""The docs' line references into the code hold (tests/line_refs.py says how they are written)."""
import glob
import os

from line_refs import check_markdown, definitions, fix_markdown, link

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_line_reference_of_the_docs_holds():
    pages = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]
    problems = [p for page in pages for p in check_markdown(page)]
    assert not problems, "a page points at lines that moved; update it:\n" + "\n".join(problems)


def test_a_reference_fails_when_its_function_moves(tmp_path):
    code = tmp_path / "code.py"
    code.write_text("import torch\n\n\ndef mask(x):\n    return x\n\n\nclass Cache:\n    @staticmethod\n"
                    "    def write(k):\n        return k\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "map.md"
    assert definitions(str(code)) == {"mask": (4, 5), "Cache": (8, 11), "Cache.write": (9, 11)}
    refs = [link(str(code), name, str(docs)) for name in ("mask", "Cache.write")]
    assert refs == ["[`mask`](../code.py#L4-L5)", "[`Cache.write`](../code.py#L9-L11)"]
    page.write_text(f"The mask is built by {refs[0]}, written by {refs[1]}; it starts at [`mask`](../code.py#L4).\n")
    assert check_markdown(str(page)) == []
    # two lines added above: every reference now points at the wrong lines, and says where they went
    code.write_text("# moved\n# down\n" + code.read_text())
    problems = check_markdown(str(page))
    assert len(problems) == 3 and "mask is now at lines 6-7" in problems[0] and "Cache.write is now at lines 11-13" in problems[1]
    # --fix rewrites them to today's lines, and they hold again
    assert fix_markdown(str(page)) == 3 and check_markdown(str(page)) == []
    assert "[`mask`](../code.py#L6-L7)" in page.read_text() and "[`mask`](../code.py#L6)." in page.read_text()
    # a name the file does not define, and a file that is not there
    page.write_text("[`masks`](../code.py#L6-L7) [`mask`](../other.py#L6-L7)\n")
    problems = check_markdown(str(page))
    assert "defines no function or class masks" in problems[0] and "no file" in problems[1]
