"""The source pass: turn a ``.cu`` text into one C++ translation unit for the emulator.

The kernel text is compiled almost unchanged; ``cuda_emu.h`` gives CUDA's keywords a C++ meaning.
Python does only what a header cannot:

1. find the ``__global__`` functions (their names, parameter names and ``__launch_bounds__``), so
   an exported entry point can be generated for each (``EMU_KERNEL(name)`` in ``emu_runtime.h``);
2. rewrite every ``__shared__`` declaration inside a function (``__shared__ float t[8][8];``,
   ``__shared__ float s;``) into an ``emu::SharedArray`` holder whose storage lives in the
   runtime's per-block arena, so it is NaN-poisoned per block, bounds- and race-checked, checked
   per dimension, and private to each OS thread in fast mode;
3. rewrite ``extern __shared__ T name[];`` (dynamic shared memory, sized at launch) into a pointer
   to the launch's dynamic buffer, because an unsized ``extern`` array has no C++ meaning that a
   macro could give it;
4. rewrite ``#pragma unroll [N]`` into ``EMU_UNROLL(N)`` (a pragma cannot be redefined by a
   macro), which fast mode turns into GCC's ``#pragma GCC unroll N``.

Before all of these, ``inline_local_includes`` puts the text of every ``#include "header.cuh"``
found beside the file (or in a ``-I`` folder) in place of the directive, so the rewrites reach
the header's code too and the module cache, keyed by the text, sees a header's edits.

Every rewrite keeps the text on the same line, and a ``#line`` directive makes compiler errors
and ``__LINE__`` (used in the barrier reports) refer to the ``.cu`` file's own line numbers.

``matching_bracket`` is the one bracket matcher of minunet's source handling (also what
``minunet.backends.sources.function_source`` needs): it raises ``ValueError`` on unbalanced text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KernelInfo:
    """What the launcher needs to know about one ``__global__`` function from its source."""

    name: str
    param_names: tuple[str, ...]
    launch_bound: str | None  # the first __launch_bounds__ argument (an expression, e.g. BLOCK)
    body_end: int             # offset just after the closing brace of the definition, -1 if none


_COMMENT_OR_STRING = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
_WORD_THEN_PAREN = re.compile(r"\s*([A-Za-z_]\w*)\s*(\()?")
_ALIGN = re.compile(r"__align__\s*\(\s*(\d+)\s*\)")
_EXTERN_SHARED = re.compile(
    r"\bextern\s+__shared__\s+((?:[A-Za-z_][\w:]*|__align__\s*\(\s*\d+\s*\))"
    r"(?:\s+(?:[A-Za-z_][\w:]*|__align__\s*\(\s*\d+\s*\)))*)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"(?<![\w])__shared__\s+([^;{}]*?);")
# One declarator of a __shared__ declaration: `name`, `name[A][B]`, `*name` (dims may be
# expressions of macros and template parameters).
_DECLARATOR = re.compile(r"^(\**)\s*([A-Za-z_]\w*)\s*((?:\[[^\[\];]+\])*)$")
_BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def blank_comments_and_strings(code: str) -> str:
    """The same text with comments and string literals replaced by spaces (newlines kept), so
    searches do not match inside them and offsets stay valid for the original text."""

    def blank(match: re.Match) -> str:
        text = match.group(0)
        if text[0] in "\"'":
            return text[0] + " " * (len(text) - 2) + text[-1]
        return re.sub(r"[^\n]", " ", text)

    return _COMMENT_OR_STRING.sub(blank, code)


# `#include "name"` at the start of a line (found in the text whose comments are blanked, so an
# include inside a /* */ comment is not one; the name is then read from the original text)
_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"[^"\n]*"[^\n]*$', re.M)


def inline_local_includes(code: str, directories, label: str) -> tuple[str, tuple[Path, ...]]:
    """``code`` with each ``#include "name"`` whose file is found in ``directories`` (searched in
    order, like a compiler's quoted includes: pass the including file's folder first) replaced by
    that file's text, recursively (a header's own includes are looked for in its folder first).
    Each file is inlined once, as if every local header had ``#pragma once``: a later include of
    it becomes an empty line. ``#line`` directives before and after an inlined text keep the line
    numbers of compiler errors, ``__LINE__`` and the emulator's reports those of the file each
    line comes from (``label`` names ``code``'s own file in them). Includes in ``<>`` and names not
    found are left to the compiler. Returns the text and the files inlined, in order.

    Why inline instead of passing ``-I``: NVRTC (CuPy's ``RawModule``) and the emulator cache a
    compiled module by its source text, so with ``-I`` an edited header would not change the key
    and the stale module would be reused; inlined, the text is everything that was compiled."""
    found: list[Path] = []

    def expand(text: str, folders: list[Path], name: str) -> str:
        clean = blank_comments_and_strings(text)
        pieces, last = [], 0
        for match in _LOCAL_INCLUDE.finditer(clean):
            include = re.search(r'"([^"\n]*)"', text[match.start():match.end()]).group(1)
            path = next((d / include for d in folders if (d / include).is_file()), None)
            if path is None:
                continue
            path = path.resolve()
            line = text.count("\n", 0, match.start()) + 1
            pieces.append(text[last:match.start()])
            if path not in found:
                found.append(path)
                body = expand(path.read_text(), [path.parent, *folders], path.name)
                pieces.append(f'#line 1 "{path.name}"\n{body.rstrip(chr(10))}\n#line {line} "{name}"\n')
            last = match.end()
        pieces.append(text[last:])
        return "".join(pieces)

    return expand(code, [Path(d) for d in directories], label), tuple(found)


def matching_bracket(text: str, open_at: int) -> int:
    """The index of the bracket that closes the one at ``open_at`` (``(``, ``[``, ``{`` or ``<``),
    counting only that kind of bracket. Raises ``ValueError`` when it is never closed. Use it on
    text whose comments and strings are blanked (``blank_comments_and_strings``)."""
    opening = text[open_at]
    if opening not in _BRACKETS:
        raise ValueError(f"offset {open_at} holds {opening!r}, not an opening bracket")
    closing, depth = _BRACKETS[opening], 0
    for i in range(open_at, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i
    line = text.count("\n", 0, open_at) + 1
    raise ValueError(f"unbalanced {opening}{closing}: the {opening!r} on line {line} is never closed")


def _param_names(params: str) -> tuple[str, ...]:
    """The last identifier of each comma-separated parameter: ``const float* __restrict__ x`` -> x."""
    names = []
    for part in params.split(","):
        words = re.findall(r"[A-Za-z_]\w*", part)
        words = [w for w in words if w not in ("__restrict__", "__restrict", "const", "volatile")]
        if words and part.strip() not in ("void", ""):
            names.append(words[-1])
    return tuple(names)


def find_kernels(code: str) -> list[KernelInfo]:
    """Every ``__global__`` function in ``code``, in source order, each name once."""
    clean = blank_comments_and_strings(code)
    kernels: dict[str, KernelInfo] = {}
    for found in re.finditer(r"\b__global__\b", clean):
        pos, bound = found.end(), None
        while (token := _WORD_THEN_PAREN.match(clean, pos)) is not None:
            word, paren = token.group(1), token.group(2)
            if not paren:
                pos = token.end()
                continue
            try:
                close = matching_bracket(clean, token.end() - 1)
            except ValueError:
                break
            inside = clean[token.end():close]
            if word == "__launch_bounds__":
                bound = inside.split(",")[0].strip() or None
                pos = close + 1
                continue
            if word in ("__attribute__", "__align__"):
                pos = close + 1
                continue
            body = re.compile(r"\s*\{").match(clean, close + 1)
            try:
                end = matching_bracket(clean, body.end() - 1) + 1 if body else -1
            except ValueError:
                end = -1  # an unclosed body: the compiler will say where
            if word not in kernels or kernels[word].body_end < 0:
                kernels[word] = KernelInfo(word, _param_names(inside), bound, end)
            break
    return list(kernels.values())


def function_scopes(clean: str) -> list[tuple[int, int]]:
    """The (start, end) offsets of the outermost braces that are code blocks (function bodies),
    not the bodies of a namespace, ``extern "C"``, struct, class, union or enum."""
    scopes, stack = [], []  # stack of (offset, is_code_block)
    for i, ch in enumerate(clean):
        if ch == "{":
            before = clean[max(0, i - 200):i]
            head = re.split(r"[;{}]", before)[-1]
            is_type_or_namespace = bool(re.search(
                r"(\bnamespace\b[\w\s:]*|\bextern\s*\"\s*\"\s*|\b(struct|class|union|enum)\b[^()]*)$", head))
            inside_code = any(code for _, code in stack)
            stack.append((i, inside_code or not is_type_or_namespace))
            if not inside_code and not is_type_or_namespace:
                scopes.append([i, len(clean)])
        elif ch == "}" and stack:
            start, code = stack.pop()
            if code and not any(c for _, c in stack):
                scopes[-1][1] = i
    return [tuple(s) for s in scopes]


def _in_scopes(pos: int, scopes: list[tuple[int, int]]) -> bool:
    return any(start < pos < end for start, end in scopes)


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[<("
        depth -= ch in "]>)"
        if ch == sep and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    parts.append(text[last:])
    return parts


def _shared_holders(body: str) -> list[tuple[str, str, str, int]] | None:
    """Parse the text between ``__shared__`` and ``;`` into (element type, name, dims, align) per
    declarator; None for a form this pass leaves alone (initialisers, function pointers...)."""
    aligns = [int(a) for a in _ALIGN.findall(body)]
    body = " ".join(_ALIGN.sub(" ", body).split())
    if not body or any(c in body for c in "=(){}"):
        return None
    declarators = _split_top_level(body)
    first = declarators[0].strip()
    found = re.match(r"^(.*?[\w>*\s])\s*(\**\s*[A-Za-z_]\w*\s*(?:\[[^\[\];]+\])*)$", first)
    if found is None:
        return None
    element = found.group(1).strip()
    if not element or not re.match(r"^[A-Za-z_]", element):
        return None
    holders = []
    for declarator in [found.group(2), *(d.strip() for d in declarators[1:])]:
        parsed = _DECLARATOR.match(declarator.strip())
        if parsed is None:
            return None
        stars, name, dims = parsed.groups()
        holders.append((f"{element}{stars}", name, "".join(dims.split()), max(aligns, default=0)))
    return holders


def rewrite_shared(code: str) -> tuple[str, int]:
    """Every ``__shared__`` declaration inside a function -> an ``emu::SharedArray`` holder (see
    cuda_emu.h) and a binding of the declared name to it, on the same line:

        __shared__ float tile[16][17];   ->
        static emu::SharedArray<float[16][17]> emu_shared_tile{"tile", "float tile[16][17]", 0};
        auto&& tile = emu_shared_tile.bind();

    In checked mode ``tile`` is then a view that checks each index against its own dimension; in
    fast mode a plain reference into this OS thread's arena. This also works inside template
    functions. Returns the text and the number of ``__shared__`` declarations left at file scope
    (plain statics in the "emu_shared" section: poisoned per block, not checked, and in fast mode
    shared by all OS threads, so a module with any runs its blocks on one thread)."""
    clean = blank_comments_and_strings(code)
    scopes = function_scopes(clean)
    pieces, last, file_scope = [], 0, 0
    for found in _STATIC_SHARED.finditer(clean):
        if re.search(r"\bextern\s*$", clean[max(0, found.start() - 40):found.start()]):
            continue  # dynamic shared memory: rewrite_extern_shared
        if not _in_scopes(found.start(), scopes):
            file_scope += 1
            continue
        holders = _shared_holders(code[found.start(1):found.end(1)])
        if holders is None:
            continue  # left as a section static: poisoned, not checked
        pieces.append(code[last:found.start()])
        decl = " ".join(code[found.start(1):found.end(1)].split()).replace("\\", "\\\\").replace('"', '\\"')
        for element, name, dims, align in holders:
            pieces.append(f'static emu::SharedArray<{element}{dims}> emu_shared_{name}{{"{name}", "{decl}", {align}}}; '
                          f"auto&& {name} = emu_shared_{name}.bind(); ")
        last = found.end()
    pieces.append(code[last:])
    return "".join(pieces), file_scope


def rewrite_extern_shared(code: str) -> str:
    """``extern __shared__ float smem[];`` -> inside a function, a pointer to the launch's dynamic
    shared buffer (``float* const smem = emu_dynamic_shared<float>();``, read when the declaration
    runs, so each OS thread sees its own block's buffer); at file scope, an object that reads the
    pointer at every use."""
    clean = blank_comments_and_strings(code)
    scopes = function_scopes(clean)
    pieces, last = [], 0
    for found in _EXTERN_SHARED.finditer(clean):
        element = " ".join(_ALIGN.sub(" ", found.group(1)).split())
        name = found.group(2)
        pieces.append(code[last:found.start()])
        if _in_scopes(found.start(), scopes):
            pieces.append(f"{element}* const {name} = emu_dynamic_shared<{element}>();")
        else:
            pieces.append(f"static emu::DynamicShared<{element}> {name};")
        last = found.end()
    pieces.append(code[last:])
    return "".join(pieces)


# `#pragma unroll`, `#pragma unroll 4`, `#pragma unroll(4)`, `#pragma unroll CO_PER_BLOCK`: the
# directive (group 2) and its count (group 3), on a line of its own (comments already blanked).
_PRAGMA_UNROLL = re.compile(
    r"^([ \t]*)(#[ \t]*pragma[ \t]+unroll\b(?:[ \t]*\(?[ \t]*([A-Za-z_]\w*|\d+)(?:[ \t]*\))?)?)(?=[ \t]*\r?$)", re.M)


def rewrite_pragma_unroll(code: str) -> str:
    """``#pragma unroll`` (CUDA: unroll completely) and ``#pragma unroll N`` (a number or a macro)
    -> ``EMU_UNROLL(64)`` and ``EMU_UNROLL(N)`` in place; the rest of the line (a comment, even
    one that continues on the next lines) and the line count stay. GCC ignores CUDA's pragma; in
    fast mode the macro is GCC's own ``#pragma GCC unroll N`` (cuda_emu.h), so a loop the kernel
    author unrolled to keep its accumulators in registers does so on the CPU too (64: more than
    any constant trip count the pragma is meant for; unlike nvcc, GCC then also unrolls a loop
    whose trip count is known only at run time, which costs compile time, not correctness).
    Checked mode leaves loops as they are. Not rewritten (so not unrolled, still correct): a
    pragma continued with a backslash, and ``_Pragma("unroll")``."""
    clean = blank_comments_and_strings(code)
    pieces, last = [], 0
    for found in _PRAGMA_UNROLL.finditer(clean):
        pieces.append(code[last:found.start(2)])
        pieces.append(f"EMU_UNROLL({found.group(3) or 64})")
        last = found.end(2)
    pieces.append(code[last:])
    return "".join(pieces)


def add_launch_bound_constants(code: str, kernels: list[KernelInfo]) -> str:
    """After each kernel with ``__launch_bounds__(EXPR)`` define ``emu_bound_value__<name> =
    (EXPR)``: the compiler evaluates EXPR where the kernel's own macros are in scope."""
    pieces, last = [], 0
    for k in sorted((k for k in kernels if k.launch_bound and k.body_end > 0), key=lambda k: k.body_end):
        pieces.append(code[last:k.body_end])
        pieces.append(f" static constexpr int emu_bound_value__{k.name} = ({k.launch_bound});")
        last = k.body_end
    pieces.append(code[last:])
    return "".join(pieces)


def translation_unit(code: str, file_label: str, kernels: list[KernelInfo]) -> str:
    """The C++ text g++ compiles: header, the (rewritten) kernel source, the runtime, entry points."""
    label = file_label.replace("\\", "\\\\").replace('"', '\\"')
    entries = "\n".join(f"EMU_KERNEL({k.name})" + (f"\nEMU_LAUNCH_BOUND({k.name})" if k.launch_bound and k.body_end > 0 else "")
                        for k in kernels)
    body, file_scope_shared = rewrite_shared(add_launch_bound_constants(code, kernels))
    body = rewrite_pragma_unroll(rewrite_extern_shared(body))
    return (
        '#include "cuda_emu.h"\n'
        f'#line 1 "{label}"\n'
        f"{body}\n"
        '#line 1 "minunet-emulator-entry-points"\n'
        '#include "emu_runtime.h"\n'
        f"{entries}\n"
        f"EMU_MODULE_INFO({file_scope_shared})\n"
    )
