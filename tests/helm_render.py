"""A small renderer for the Go-template subset the BrainLine Helm chart uses,
so that the chart can be rendered and validated without the helm binary.

Supported: ``{{ }}`` actions with ``-`` whitespace trimming and ``/* */``
comments; ``.Values``/``.Release``/``.Chart``/``.Files.Get``, ``$`` and
``$var`` (``:=``); pipelines with ``|`` and parentheses; ``if``/``else``/
``end``, ``range`` (``$v :=`` and ``$k, $v :=``), ``define``/``include``;
functions ``quote``, ``toYaml``, ``nindent``, ``indent``, ``printf``,
``trunc``, ``trimSuffix``, ``default``, ``ternary``, ``index``, ``dict``,
``list``, ``eq``, ``ne``, ``and``, ``or``, ``not``, ``toString``. Anything else
raises ``TemplateError`` naming the file, so a template using a construct the
renderer does not know fails the test instead of rendering wrongly.
Not covered (helm's own semantics left unchecked): sprig functions other
than those above, ``with``, ``tpl``, ``lookup``, ``required``, subchart
rendering (postgresql/redis dependencies), ``.Capabilities``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml


class TemplateError(Exception):
    pass


_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'''\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>:=|\||\(|\)|,)|'''
                    r'''(?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)|(?P<field>(?:\.[A-Za-z0-9_]+)+|\.)|'''
                    r'''(?P<ident>[A-Za-z_][A-Za-z0-9_]*))''')


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot parse {expr[pos:]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return out


# -- parse into nodes ---------------------------------------------------------
def _lex(text: str) -> list:
    parts, pos = [], 0
    for m in _ACTION.finditer(text):
        parts.append(("text", text[pos:m.start()], m.group(1) == "-"))
        parts.append(("action", m.group(2), m.group(3) == "-"))
        pos = m.end()
    parts.append(("text", text[pos:], False))
    # apply trimming: "{{-" trims the text before, "-}}" the text after
    out = []
    trim_next = False
    for kind, value, flag in parts:
        if kind == "text":
            if trim_next:
                value = value.lstrip()
            if flag:
                value = value.rstrip()
            out.append(("text", value))
            trim_next = False
        else:
            out.append(("action", value))
            trim_next = flag
    return out


def _parse(items: list, i: int = 0, stop=("end",)):
    nodes = []
    while i < len(items):
        kind, value = items[i]
        if kind == "text":
            if value:
                nodes.append(("text", value))
            i += 1
            continue
        if value.startswith("/*"):
            i += 1
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in ("end", "else") and word in stop:
            return nodes, i
        if word == "if":
            body, i = _parse(items, i + 1, stop=("end", "else"))
            other = []
            if items[i][1].strip() == "else":
                other, i = _parse(items, i + 1, stop=("end",))
            elif items[i][1].startswith("else"):
                raise TemplateError("'else if' is not supported")
            nodes.append(("if", value[2:].strip(), body, other))
            i += 1
        elif word == "range":
            body, i = _parse(items, i + 1, stop=("end",))
            nodes.append(("range", value[5:].strip(), body))
            i += 1
        elif word == "define":
            body, i = _parse(items, i + 1, stop=("end",))
            nodes.append(("define", json.loads(value[6:].strip()), body))
            i += 1
        elif word in ("with", "block", "template", "else", "end"):
            raise TemplateError(f"'{word}' is not supported here")
        else:
            nodes.append(("action", value))
            i += 1
    if stop != ("end",) or True:
        return nodes, i


class _Files:
    def __init__(self, root: Path):
        self.root = root

    def Get(self, name):  # noqa: N802 - helm's name
        return (self.root / name).read_text()


def _truthy(v) -> bool:
    return bool(v) if v is not None else False


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        raise TemplateError(f"a map or list printed directly: {v!r}")
    return str(v)


def _to_yaml(v) -> str:
    if v in ({}, []):
        return "{}" if v == {} else "[]"
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n")


def _printf(fmt, *args):
    return re.sub(r"%[sdv]", "{}", fmt).format(*(_fmt(a) for a in args))


def _indent(n, s):
    return "\n".join((" " * int(n) + line) if line else line for line in str(s).split("\n"))


FUNCS = {
    "quote": lambda *a: " ".join(json.dumps(_fmt(x)) for x in a),
    "toYaml": _to_yaml,
    "nindent": lambda n, s: "\n" + _indent(n, s),
    "indent": _indent,
    "printf": _printf,
    "trunc": lambda n, s: str(s)[:int(n)],
    "trimSuffix": lambda suf, s: s[:-len(suf)] if suf and s.endswith(suf) else s,
    "default": lambda d, v=None: v if _truthy(v) else d,
    "ternary": lambda a, b, c: a if _truthy(c) else b,
    "index": lambda m, *keys: _index(m, keys),
    "dict": lambda *kv: {kv[i]: kv[i + 1] for i in range(0, len(kv), 2)},
    "list": lambda *v: list(v),
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda v: not _truthy(v),
    "toString": _fmt,
}


def _index(m, keys):
    for k in keys:
        m = m.get(k) if isinstance(m, dict) else m[k]
    return m


def _field(value, path: str):
    for name in [p for p in path.split(".") if p]:
        if isinstance(value, dict):
            value = value.get(name)
        elif value is None:
            return None
        else:
            value = getattr(value, name)
    return value


class Renderer:
    def __init__(self, chart_dir: Path, values: dict, release: str = "test", namespace: str = "default"):
        self.chart_dir = Path(chart_dir)
        chart = yaml.safe_load((self.chart_dir / "Chart.yaml").read_text())
        self.root = {
            "Values": values,
            "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
            "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart.get("appVersion")},
            "Files": _Files(self.chart_dir),
        }
        self.defines: dict[str, list] = {}
        self.templates: dict[str, list] = {}
        for path in sorted((self.chart_dir / "templates").iterdir()):
            nodes, _ = _parse(_lex(path.read_text()))
            for node in nodes:
                if node[0] == "define":
                    self.defines[node[1]] = node[2]
            if not path.name.startswith("_"):
                self.templates[path.name] = [n for n in nodes if n[0] != "define"]

    # -- evaluation ---------------------------------------------------------
    def _term(self, tok, dot, env):
        kind, value = tok
        if kind == "str":
            return json.loads(value)
        if kind == "num":
            return float(value) if "." in value else int(value)
        if kind == "field":
            return dot if value == "." else _field(dot, value)
        if kind == "var":
            name, _, rest = value.partition(".")
            if name not in env:
                raise TemplateError(f"undefined variable {name}")
            return _field(env[name], rest) if rest else env[name]
        if kind == "ident":
            if value in ("true", "false"):
                return value == "true"
            if value == "nil":
                return None
        raise TemplateError(f"unexpected {value!r}")

    def _command(self, toks, dot, env, piped=None, has_piped=False):
        args, i = [], 0
        while i < len(toks):
            kind, value = toks[i]
            if kind == "op" and value == "(":
                depth, j = 1, i + 1
                while depth:
                    if toks[j] == ("op", "("):
                        depth += 1
                    elif toks[j] == ("op", ")"):
                        depth -= 1
                    j += 1
                args.append(("value", self._pipeline(toks[i + 1:j - 1], dot, env)))
                i = j
            else:
                args.append(toks[i])
                i += 1
        head = args[0]
        if head[0] == "ident" and head[1] not in ("true", "false", "nil"):
            name = head[1]
            values = [a[1] if a[0] == "value" else self._term(a, dot, env) for a in args[1:]]
            if has_piped:
                values.append(piped)
            if name == "include":
                return self.include(values[0], values[1])
            if name in ("and", "or"):
                result = values[0]
                for v in values:
                    result = v
                    if (name == "and") != _truthy(v):
                        break
                return result
            if name not in FUNCS:
                raise TemplateError(f"function {name!r} is not supported by the test renderer")
            return FUNCS[name](*values)
        value = head[1] if head[0] == "value" else self._term(head, dot, env)
        rest = [a[1] if a[0] == "value" else self._term(a, dot, env) for a in args[1:]]
        if has_piped:
            rest.append(piped)
        if callable(value):
            return value(*rest)
        if rest:
            raise TemplateError(f"{head[1]!r} is not a function")
        return value

    def _pipeline(self, toks, dot, env):
        commands, current, depth = [], [], 0
        for tok in toks:
            if tok == ("op", "("):
                depth += 1
            elif tok == ("op", ")"):
                depth -= 1
            if tok == ("op", "|") and depth == 0:
                commands.append(current)
                current = []
            else:
                current.append(tok)
        commands.append(current)
        value = self._command(commands[0], dot, env)
        for cmd in commands[1:]:
            value = self._command(cmd, dot, env, value, True)
        return value

    def _eval(self, expr: str, dot, env):
        toks = _tokens(expr)
        if len(toks) >= 2 and toks[0][0] == "var" and toks[1] == ("op", ":="):
            env[toks[0][1]] = self._pipeline(toks[2:], dot, env)
            return None
        return self._pipeline(toks, dot, env)

    def _render(self, nodes, dot, env) -> str:
        out = []
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "action":
                value = self._eval(node[1], dot, env)
                if not (node[1].split()[0].startswith("$") and ":=" in node[1]):
                    out.append(_fmt(value))
            elif kind == "if":
                branch = node[2] if _truthy(self._eval(node[1], dot, env)) else node[3]
                out.append(self._render(branch, dot, dict(env)))
            elif kind == "range":
                toks = _tokens(node[1])
                names = []
                if ("op", ":=") in toks:
                    k = toks.index(("op", ":="))
                    names = [t[1] for t in toks[:k] if t[0] == "var"]
                    toks = toks[k + 1:]
                seq = self._pipeline(toks, dot, env) or []
                pairs = list(seq.items()) if isinstance(seq, dict) else list(enumerate(seq))
                for key, item in pairs:
                    scope = dict(env)
                    if len(names) == 1:
                        scope[names[0]] = item
                    elif len(names) == 2:
                        scope[names[0]], scope[names[1]] = key, item
                    out.append(self._render(node[2], item, scope))
        return "".join(out)

    def include(self, name: str, dot) -> str:
        if name not in self.defines:
            raise TemplateError(f"template {name!r} is not defined")
        return self._render(self.defines[name], dot, {"$": dot})

    def render(self) -> dict[str, str]:
        out = {}
        for name, nodes in self.templates.items():
            try:
                out[name] = self._render(nodes, self.root, {"$": self.root})
            except TemplateError as exc:
                raise TemplateError(f"{name}: {exc}") from None
        return out

    def manifests(self) -> list[dict]:
        docs = []
        for name, text in self.render().items():
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc.setdefault("__source__", name)
                    docs.append(doc)
        return docs


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render_chart(chart_dir: Path, overrides: dict | None = None, release: str = "test") -> list[dict]:
    values = yaml.safe_load((Path(chart_dir) / "values.yaml").read_text())
    return Renderer(chart_dir, deep_merge(values, overrides or {}), release).manifests()
