"""The source pass: turn a ``.cu`` text into one C++ translation unit for the emulator.

The kernel text is compiled almost unchanged; ``cuda_emu.h`` gives CUDA's keywords a C++ meaning.
Python does only what a header cannot:

1. find the ``__global__`` functions (their names, parameter names and ``__launch_bounds__``), so
   an exported entry point can be generated for each (``EMU_KERNEL(name)`` in ``emu_runtime.h``);
2. rewrite ``extern __shared__ T name[];`` (dynamic shared memory, sized at launch) into a
   reference to the runtime's per-launch buffer, because an unsized ``extern`` array has no C++
   meaning that could be given to it by a macro.

Every rewrite keeps the text on the same line, and a ``#line`` directive makes compiler errors
and ``__LINE__`` (used in the barrier reports) refer to the ``.cu`` file's own line numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelInfo:
    """What the launcher needs to know about one ``__global__`` function from its source."""

    name: str
    param_names: tuple[str, ...]
    launch_bound: str | None  # the first __launch_bounds__ argument (an expression, e.g. BLOCK)
    body_end: int             # offset just after the closing brace of the definition, -1 if none


_COMMENT_OR_STRING = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
_WORD_THEN_PAREN = re.compile(r"\s*([A-Za-z_]\w*)\s*(\()?")
_EXTERN_SHARED = re.compile(
    r"\bextern\s+__shared__\s+"
    r"(?:__align__\s*\((?:[^()]|\([^()]*\))*\)\s*)?"   # optional __align__(16)
    r"([A-Za-z_][\w\s]*?)\s+"                            # the element type, e.g. "unsigned char"
    r"(?:__align__\s*\((?:[^()]|\([^()]*\))*\)\s*)?"
    r"([A-Za-z_]\w*)\s*\[\s*\]\s*;"
)


_STATIC_SHARED = re.compile(
    r"(?<![\w])(?<!extern )__shared__\s+"
    r"((?:__align__\s*\((?:[^()]|\([^()]*\))*\)\s*)?[A-Za-z_][\w\s:]*?)\s+"  # element type
    r"([A-Za-z_]\w*)\s*((?:\[[^\[\];]+\])+)\s*;"                              # name[dims]
)


def blank_comments_and_strings(code: str) -> str:
    """The same text with comments and string literals replaced by spaces (newlines kept), so
    searches do not match inside them and offsets stay valid for the original text."""

    def blank(match: re.Match) -> str:
        text = match.group(0)
        if text[0] in "\"'":
            return text[0] + " " * (len(text) - 2) + text[-1]
        return re.sub(r"[^\n]", " ", text)

    return _COMMENT_OR_STRING.sub(blank, code)


def _matching_paren(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced parentheses")


def _matching_brace(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


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
                close = _matching_paren(clean, token.end() - 1)
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
            end = _matching_brace(clean, body.end() - 1) + 1 if body else -1
            if word not in kernels or kernels[word].body_end < 0:
                kernels[word] = KernelInfo(word, _param_names(inside), bound, end)
            break
    return list(kernels.values())


def rewrite_extern_shared(code: str) -> str:
    """``extern __shared__ float smem[];`` -> a reference to the launch's dynamic shared buffer.

    The reference works at file scope and inside functions alike, and always reads the current
    launch's pointer (``emu::dynamic_shared``, a ``char*``; the module is compiled with
    ``-fno-strict-aliasing`` so reading it as a ``T*`` is well defined for GCC)."""
    clean = blank_comments_and_strings(code)
    pieces, last = [], 0
    for found in _EXTERN_SHARED.finditer(clean):
        element, name = " ".join(found.group(1).split()), found.group(2)
        pieces.append(code[last:found.start()])
        pieces.append(f"static {element}* const& {name} = "
                      f"reinterpret_cast<{element}* const&>(emu::dynamic_shared);")
        last = found.end()
    pieces.append(code[last:])
    return "".join(pieces)


def guard_shared_arrays(code: str) -> str:
    """``__shared__ float tile[16][17];`` -> an ``emu::SharedArray`` holder whose storage the
    runtime hands out (between redzones, registered by name, poisoned with NaN at every block),
    plus a reference named ``tile`` to it, so the kernel text works unchanged and ``tile[16][0]``
    is reported as out of bounds. This also works inside template functions, where GCC ignores
    the linker-section attribute that plain ``__shared__`` variables rely on.

    Declarations of another form (scalars, several names in one declaration) stay as they are:
    poisoned with NaN like every __shared__ variable, but not bounds-checked."""
    clean = blank_comments_and_strings(code)
    pieces, last = [], 0
    for found in _STATIC_SHARED.finditer(clean):
        element, name = " ".join(found.group(1).split()), found.group(2)
        dims = "".join(found.group(3).split())
        if "__align__" in element:  # an aligned array keeps its plain form (unchecked)
            continue
        pieces.append(code[last:found.start()])
        pieces.append(f'static emu::SharedArray<{element}{dims}> emu_shared_{name}{{"{name}"}}; '
                      f"auto& {name} = *emu_shared_{name}.value;")
        last = found.end()
    pieces.append(code[last:])
    return "".join(pieces)


def add_launch_bound_constants(code: str, kernels: list[KernelInfo]) -> str:
    """After each kernel with ``__launch_bounds__(EXPR)`` define ``emu_launch_bound__<name> =
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
    body = rewrite_extern_shared(guard_shared_arrays(add_launch_bound_constants(code, kernels)))
    return (
        '#include "cuda_emu.h"\n'
        f'#line 1 "{label}"\n'
        f"{body}\n"
        '#line 1 "minunet-emulator-entry-points"\n'
        '#include "emu_runtime.h"\n'
        f"{entries}\n"
    )
