"""
Line references from the docs into the code, kept true by a test (tests/test_line_refs.py).

A reference is a Markdown link whose text is a function or class name in backticks (a method
as `Class.method`) and whose target is a .py file of the project with a line range:

    [`encoder_mask`](../e2d2.py#L253-L275)      the range holds `def encoder_mask` .. its last line
    [`KVCache.append`](../e2d2.py#L648-L657)    a method
    [`generate`](../e2d2.py#L831)               one line: where the definition starts

The path is relative to the Markdown file (as the code host resolves it). A reference holds
when the named definition (its decorators, its def line, its last line) lies within [a, b];
a one-line reference holds when the definition starts on that line. Print the current ranges
to paste into a page:

    python tests/line_refs.py e2d2.py encoder_mask decoder_mask KVCache.append  # links as from docs/
    python tests/line_refs.py --check docs/*.md README.md                       # check every reference
    python tests/line_refs.py --fix docs/paper_to_code.md                       # rewrite every range to today's
"""

import ast
import os
import re
import sys

REF = re.compile(r"\[`(?P<name>[A-Za-z_][\w.]*)`\]\((?P<path>[^)#\s]+\.py)#L(?P<a>\d+)(?:-L(?P<b>\d+))?\)")


def definitions(py_path: str) -> dict:
    """name -> (first line, last line) of every function and class of a file, methods as
    Class.method; the first line is the first decorator's, if any."""
    tree = ast.parse(open(py_path, encoding="utf-8").read(), py_path)
    out = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                out[prefix + child.name] = (first, child.end_lineno)
                if isinstance(child, ast.ClassDef):
                    visit(child, prefix + child.name + ".")
    visit(tree, "")
    return out


def check_markdown(md_path: str) -> list:
    """The problems of every reference in a Markdown file, each a sentence that names the
    reference, where the definition is now, and the command that prints it ([] if none)."""
    text = open(md_path, encoding="utf-8").read()
    problems, cache = [], {}
    for m in REF.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        where = f"{md_path}:{line}: [`{m['name']}`]({m['path']}#L{m['a']}{'-L' + m['b'] if m['b'] else ''})"
        py = os.path.normpath(os.path.join(os.path.dirname(md_path), m["path"]))
        if not os.path.exists(py):
            problems.append(f"{where}: no file {py}")
            continue
        defs = cache.setdefault(py, definitions(py))
        if m["name"] not in defs:
            problems.append(f"{where}: {py} defines no function or class {m['name']}")
            continue
        first, last = defs[m["name"]]
        a, b = int(m["a"]), int(m["b"] or 0)
        ok = (a <= first and last <= b) if b else a == first
        if not ok:
            problems.append(f"{where}: {m['name']} is now at lines {first}-{last} of {py} "
                            f"(python tests/line_refs.py {os.path.relpath(py)} {m['name']} prints its link)")
    return problems


def fix_markdown(md_path: str) -> int:
    """Rewrite every reference of a Markdown file to its definition's current range (a
    one-line reference to its current first line); returns how many changed. A name the file
    no longer defines is left as it is (check_markdown reports it)."""
    text = open(md_path, encoding="utf-8").read()
    cache, changed = {}, 0

    def new(m):
        nonlocal changed
        py = os.path.normpath(os.path.join(os.path.dirname(md_path), m["path"]))
        defs = cache.setdefault(py, definitions(py) if os.path.exists(py) else {})
        if m["name"] not in defs:
            return m[0]
        first, last = defs[m["name"]]
        out = f"[`{m['name']}`]({m['path']}#L{first}" + (f"-L{last})" if m["b"] else ")")
        changed += out != m[0]
        return out
    text = REF.sub(new, text)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)
    return changed


def link(py_path: str, name: str, relative_to: str = "docs") -> str:
    """The Markdown reference to a definition as it stands, from a page in `relative_to`."""
    first, last = definitions(py_path)[name]
    rel = os.path.relpath(os.path.abspath(py_path), os.path.abspath(relative_to))
    return f"[`{name}`]({rel}#L{first}-L{last})"


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        sys.exit(__doc__)
    if args[0] == "--check":
        problems = [p for md in args[1:] for p in check_markdown(md)]
        print("\n".join(problems) or f"every reference holds ({len(args) - 1} files)")
        sys.exit(1 if problems else 0)
    if args[0] == "--fix":
        for md in args[1:]:
            print(f"{md}: {fix_markdown(md)} references updated")
        sys.exit(0)
    py, names = args[0], args[1:]
    defs = definitions(py)
    for name in names or sorted(defs, key=defs.get):
        if name not in defs:
            sys.exit(f"error: {py} defines no function or class {name}")
        print(link(py, name))
