"""Interpolation: Prodigy's syntax and rendering, and shell rendering that never executes values.

Shell tests run the rendered script with the real ``/bin/sh -c`` in a temporary directory and
check both the output and that no ``PWNED`` file appeared.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jetreduce.lang.interpolate import (
    SPILL_THRESHOLD_BYTES,
    InterpolationError,
    ShellCommand,
    Variables,
    item_scopes,
    render_shell,
    render_text,
    render_value,
)

HOSTILE = [
    "$(touch PWNED)",
    "`touch PWNED`",
    "; touch PWNED",
    "' ; touch PWNED ; '",
    '" ; touch PWNED ; "',
    "a\nb\n; touch PWNED\n",
    "back\\slash \\n \\\\ \\",
    "*",
    "~ $HOME ${HOME} $((1+1)) $1",
    "EOF\ntouch PWNED\nEOF",
    "-n",
    "  leading and trailing spaces  ",
    "'\"'\"`$(",
    "\t\ttabbed\n\tEOF",
]


def sh(cmd: ShellCommand, cwd: Path) -> str:
    """Run ``cmd`` with /bin/sh and a minimal environment; return stdout, assert no side effect."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/home/test", **cmd.env}
    proc = subprocess.run(
        ["/bin/sh", "-c", cmd.script],
        env=env,
        cwd=cwd,
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 0, (cmd, proc.stderr)
    assert not (cwd / "PWNED").exists(), cmd
    return proc.stdout.decode("utf-8", "surrogateescape")  # bytes: no newline translation


def item_vars(value: Any) -> Variables:
    return Variables({**item_scopes({"v": value, "n": 7}, 0), "VALUE": value})


# --- rendering of values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("raw ' string", "raw ' string"),
        (42, "42"),
        (2.5, "2.5"),
        (True, "true"),
        (False, "false"),
        (None, ""),
        (["a", "b"], "a, b"),
        ([], ""),
        ([1, "a"], '[1,"a"]'),
        ({"a": [1, {"b": None}]}, '{"a":[1,{"b":null}]}'),
    ],
)
def test_render_value(value: Any, text: str) -> None:
    assert render_value(value) == text


def test_variables_lookup() -> None:
    v = Variables(
        {
            "item": {"a": {"b": 1}, "tags": ["x", "y"], "list": [{"k": "deep"}]},
            "map.total": 7,
            "map": {"total": "shadowed"},
            "map.results": [{"item_id": "item_0"}],
            "1": "first",
        }
    )
    assert v["item.a.b"] == 1
    assert v["item.tags[1]"] == "y"
    assert v["item.list[0].k"] == "deep"
    assert v["map.total"] == 7  # the longest flat key wins
    assert v["map.results[0].item_id"] == "item_0"
    assert v["1"] == "first"
    assert "item.nope" not in v
    assert "item.tags[5]" not in v
    with pytest.raises(KeyError):
        v["item.a.b.c"]
    assert sorted(v) == ["1", "item", "map", "map.results", "map.total"]
    assert len(v) == 5


def test_item_renders_as_compact_json_or_raw_string() -> None:
    assert Variables(item_scopes(["a", "b"], 0)).render("item") == '["a","b"]'
    assert Variables(item_scopes("plain", 0)).render("item") == "plain"
    scopes = item_scopes({"id": 1}, 3)
    assert scopes["item_id"] == "item_3"
    assert scopes["item_json"] == '{"id":1}'
    assert Variables(scopes).render("item") == '{"id":1}'


def test_render_text() -> None:
    v = Variables({"item": {"name": "x", "tags": ["a", "b"]}, "NAME": "n", "1": "arg", "z": None})
    assert render_text("${item.name}-$NAME-$1-${item.tags}", v) == "x-n-arg-a, b"
    assert render_text("${missing:-fallback} ${item.name:-unused}", v) == "fallback x"
    assert render_text("${missing:-}|", v) == "|"
    assert render_text("${missing} $missing ${item.nope}", v) == "${missing} $missing ${item.nope}"
    assert render_text("[${z}]", v) == "[]"  # null is resolved: "" and no default
    assert render_text("$NAME_x ${NAME}_x", v) == "$NAME_x n_x"
    assert render_text("cost: $5 ${}", v) == "cost: $5 ${}"


# --- shell rendering: script shapes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "script"),
    [
        ("echo ${item.v}", 'echo "${JR_V0}"'),
        ('echo "x ${item.v} y"', 'echo "x ${JR_V0} y"'),
        ("echo 'x ${item.v} y'", "echo 'x '\"${JR_V0}\"' y'"),
        ("cat <<EOF\n${item.v}\nEOF\n", "cat <<EOF\n${JR_V0}\nEOF\n"),
        ("echo $((${item.n} + 1))", "echo $((${JR_V0} + 1))"),
        ("echo $(echo ${item.v})", 'echo $(echo "${JR_V0}")'),
        ('echo "$(echo "${item.v}")"', 'echo "$(echo "${JR_V0}")"'),
        ("echo `echo ${item.v}`", 'echo `echo "${JR_V0}"`'),
        ("echo ${item.v} $VALUE", 'echo "${JR_V0}" "${JR_V0}"'),  # equal values share a var
        ('echo \\${item.v} "\\${item.v}"', 'echo \\${item.v} "\\${item.v}"'),
        ("echo ok # ${item.v} it's", "echo ok # ${item.v} it's"),
        ("echo a#${item.v}", 'echo a#"${JR_V0}"'),
        ("echo $$ $? ${unknown} $HOME", "echo $$ $? ${unknown} $HOME"),
        ("x=${missing:-dflt}", 'x="${JR_V0}"'),
    ],
)
def test_script_shapes(template: str, script: str) -> None:
    v = Variables({"item": {"v": "val", "n": 3}, "VALUE": "val"})
    assert render_shell(template, v).script == script


def test_env_holds_values() -> None:
    cmd = render_shell("echo ${item.v} ${item.n}", item_vars("hello"))
    assert cmd.env == {"JR_V0": "hello", "JR_V1": "7"}
    assert cmd.argv == ["sh", "-c", cmd.script]
    assert cmd.spill_files == ()


# --- shell rendering: every context, run by sh -----------------------------------------------


CONTEXT_TEMPLATES = {
    "unquoted": ("printf '%s|' ${item.v}", "{v}|"),
    "dquote": ("printf '%s|' \"<${item.v}>\"", "<{v}>|"),
    "squote": ("printf '%s|' '<${item.v}>'", "<{v}>|"),
    "adjacent": ("printf '%s|' pre${item.v}post", "pre{v}post|"),
    "cmdsub": ("printf '%s|' \"$(printf '%s' ${item.v})\"", "{v}|"),
    "cmdsub_squote": ("printf '%s|' \"$(printf '%s' '${item.v}')\"", "{v}|"),
    "backtick": ("x=`printf '%s' \"${item.v}\"`; printf '%s|' \"$x\"", "{v}|"),
    "backtick_in_dquote": ("printf '%s|' \"`printf '%s' \\\"${item.v}\\\"`\"", "{v}|"),
    "heredoc": ("cat <<EOF\n<${item.v}>\nEOF", "<{v}>\n"),
    "heredoc_dash": ("cat <<-EOF\n\t<${item.v}>\n\tEOF", "<{v}>\n"),
    "heredoc_in_cmdsub": ('x="$(cat <<END\n${item.v}\nEND\n)"; printf "%s|" "$x"', "{v}|"),
    "two_heredocs": ("cat <<A; cat <<'B'\n1${item.v}\nA\n2\nB", "1{v}\n2\n"),
    "assignment": ("x=${item.v}; printf '%s|' \"$x\"", "{v}|"),
    "case": ("case ${item.v} in *) printf '%s|' matched;; esac", "matched|"),
}


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("context", sorted(CONTEXT_TEMPLATES))
def test_hostile_values_are_inert_in_every_context(
    context: str, value: str, tmp_path: Path
) -> None:
    template, expected = CONTEXT_TEMPLATES[context]
    out = sh(render_shell(template, item_vars(value)), tmp_path)
    if context in (
        "cmdsub",
        "cmdsub_squote",
        "backtick",
        "backtick_in_dquote",
        "heredoc_in_cmdsub",
    ):
        value = value.rstrip("\n")  # command substitution drops trailing newlines
    # (<<- strips tabs from template lines only: an expanded value keeps its tabs.)
    assert out == expected.format(v=value)


@pytest.mark.parametrize("value", [v for v in HOSTILE if "EOF" not in v])
def test_quoted_heredoc_pastes_raw(value: str, tmp_path: Path) -> None:
    cmd = render_shell("cat <<'EOF'\n${item.v}\nEOF\n", item_vars(value))
    assert cmd.env == {}
    assert sh(cmd, tmp_path) == value + "\n"
    cmd = render_shell('cat <<"EOF"\n[${item.v}]\nEOF\n', item_vars(value))
    assert sh(cmd, tmp_path) == f"[{value}]\n"


@pytest.mark.parametrize(
    "template", ["cat <<'EOF'\n${item.v}\nEOF", "cat <<-\\EOF\n${item.v}\nEOF"]
)
def test_value_closing_a_quoted_heredoc_is_refused(template: str) -> None:
    with pytest.raises(InterpolationError, match="here-document"):
        render_shell(template, item_vars("ok\nEOF\ntouch PWNED"))


def test_quoted_heredoc_checks_the_whole_rendered_line() -> None:
    with pytest.raises(InterpolationError):
        render_shell("cat <<'XEOF'\nX${item.v}\nXEOF", item_vars("EOF"))


def test_echo_round_trips(tmp_path: Path) -> None:
    for value in ["$(touch PWNED)", "`touch PWNED`", "; touch PWNED", "' ; touch PWNED ; '"]:
        for template in ["echo ${item.v}", "echo '${item.v}'", 'echo "${item.v}"']:
            assert sh(render_shell(template, item_vars(value)), tmp_path) == value + "\n"


def test_globs_do_not_expand(tmp_path: Path) -> None:
    (tmp_path / "a.txt").touch()
    (tmp_path / "b.txt").touch()
    assert sh(render_shell("echo ${item.v}", item_vars("*.txt")), tmp_path) == "*.txt\n"


def test_unresolved_references_stay_for_the_shell(tmp_path: Path) -> None:
    cmd = render_shell('X=from-shell; echo "$X ${X}" $nope ${item.nope:-dflt}', item_vars("v"))
    assert sh(cmd, tmp_path) == "from-shell from-shell dflt\n"


def test_escaped_dollar_and_comments_are_left_alone(tmp_path: Path) -> None:
    cmd = render_shell('echo \\$VALUE "\\${VALUE}" # ${item.v} won\'t', item_vars("v"))
    assert cmd.env == {}
    assert sh(cmd, tmp_path) == "$VALUE ${VALUE}\n"


def test_arithmetic_accepts_integers_only(tmp_path: Path) -> None:
    assert sh(render_shell("echo $(( ${item.n} * 2 ))", item_vars("x")), tmp_path) == "14\n"
    with pytest.raises(InterpolationError, match="integer"):
        render_shell("echo $((${item.v}))", item_vars("a[$(touch PWNED)]"))


def test_nul_is_refused() -> None:
    with pytest.raises(InterpolationError, match="NUL"):
        render_shell("echo ${item.v}", item_vars("a\0b"))
    with pytest.raises(InterpolationError, match="NUL"):
        render_shell("cat <<'E'\n${item.v}\nE", item_vars("a\0b"))


def test_large_values_spill_to_files(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    big = "$(touch PWNED) '\"`\n" * (SPILL_THRESHOLD_BYTES // 10)
    results = [{"item_id": "item_0", "output": big}]
    v = Variables({"map.results": results, "map.total": 1})
    cmd = render_shell(
        "printf '%s' ${map.results} > a; printf '%s' \"${map.results}\" > b; "
        "printf '%s' '${map.results}' > c; cat > d <<EOF\n${map.results}\nEOF\n"
        "echo ${map.total}",
        v,
        spill_dir=tmp_path,
    )
    assert len(cmd.spill_files) == 1
    assert cmd.spill_files[0].parent == tmp_path
    assert set(cmd.env) == {"JR_F0", "JR_V0"}
    assert all(len(value) < SPILL_THRESHOLD_BYTES for value in cmd.env.values())
    assert big not in cmd.script
    assert sh(cmd, work) == "1\n"
    expected = render_value(results)
    for name in "abc":
        assert (work / name).read_text() == expected
    assert (work / "d").read_text() == expected + "\n"


def test_large_value_without_spill_dir() -> None:
    mid = "x" * (SPILL_THRESHOLD_BYTES + 10)
    assert render_shell("echo ${VALUE}", item_vars(mid)).env["JR_V0"] == mid
    with pytest.raises(InterpolationError, match="spill_dir"):
        render_shell("echo ${VALUE}", item_vars("x" * 200_000))


# --- property: any text comes back verbatim --------------------------------------------------

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"))


@settings(max_examples=60, deadline=None)
@given(value=TEXT)
def test_any_value_prints_verbatim(value: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    cwd = tmp_path_factory.mktemp("prop")
    v = item_vars(value)
    script = (
        "printf '%s\\0' '${item.v}'; printf '%s\\0' \"${item.v}\"; printf '%s\\0' ${item.v}; "
        "cat <<EOF\n${item.v}\nEOF\nprintf '\\0'; echo '${item_id}' ${item.n}"
    )
    out = sh(render_shell(script, v), cwd)
    assert out.split("\0") == [value, value, value, value + "\n", "item_0 7\n"]
