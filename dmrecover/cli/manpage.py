"""dmrecover(8) and the bash completion, both generated from the parser: what `--help`
says is what the man page and the completion say. scripts/install.sh installs them:

    python -m dmrecover.cli.manpage man > dmrecover.8
    python -m dmrecover.cli.manpage bash-completion > dmrecover
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from dmrecover import __version__
from dmrecover.cli.parser import build_parser

Verb = tuple[str, argparse.ArgumentParser]

_SECTIONS = """\
.SH FILES
.TP
.I /var/lib/dmrecover/SESSION/
a session's state dir (\\fB\\-\\-state\\-dir\\fR elsewhere): session.json (the record),
status.json (rewritten every half second while it runs), session.log, and the engine's files
(overlay.img with the application's writes, overlay.map, the restore map) unless
\\fB\\-\\-overlay\\fR puts those elsewhere. Private to root (0700/0600).
.TP
.I /etc/systemd/system/dmrecover\\-session@.service
the unit that resumes a session after a reboot; one instance is enabled per session.
.TP
.I /etc/udev/rules.d/56\\-dmrecover.rules
udev rules that keep the dm backend's internal devices away from LVM, systemd and udisks.
.SH ENVIRONMENT
.TP
.B DMRECOVER_PASSWORD, DMRECOVER_PASSWORD_FILE
the repository password, or a file whose first line is it (see \\fB\\-\\-password\\-file\\fR).
.TP
.B DMRECOVER_STATE_ROOT
where sessions' state dirs are made (default /var/lib/dmrecover).
.SH EXIT STATUS
0 on success; 2 for a usage error; another non-zero code for every other error, each
reported as one line \\fBdmrecover: error: ...\\fR on standard error (nothing changed).
.SH EXAMPLES
.nf
dmrecover repo init /srv/backups
dmrecover backup /dev/vg0/data \\-\\-repo /srv/backups \\-\\-name data
dmrecover live\\-restore \\-\\-repo /srv/backups data /dev/vg0/new \\\\
    \\-\\-mount /var/lib/app \\-\\-app\\-unit app.service
dmrecover status \\-\\-watch
dmrecover cutover app
dmrecover forget app
.fi
.SH SEE ALSO
The runbook docs/operations.md in the source tree;
.BR systemctl (1),
.BR journalctl (1),
.BR dmsetup (8),
.BR losetup (8).
"""


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)


def listed_verbs(p: argparse.ArgumentParser) -> set[str]:
    """The verbs `--help` lists (an internal verb is added without help: not listed)."""
    sub = _subparsers(p)
    return {a.dest for a in sub._choices_actions} if sub else set()


def walk(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Verb]:
    """Every leaf verb as ("repo key add", parser), in the order --help lists them; internal
    verbs left out."""
    sub = _subparsers(p)
    if sub is None:
        yield " ".join(path), p
        return
    shown = listed_verbs(p)
    for name, child in sub.choices.items():
        if name in shown:
            yield from walk(child, (*path, name))


def options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """A verb's arguments and options, the help option left out."""
    return [a for a in p._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and a.help is not argparse.SUPPRESS]


def expanded_help(p: argparse.ArgumentParser, a: argparse.Action) -> str:
    """The action's help as --help prints it (%(default)s and the like filled in)."""
    formatter = p._get_formatter()
    return formatter._expand_help(a) if a.help else ""


def _esc(text: str) -> str:
    """Roff-safe text: backslashes and dashes escaped, no line starting with a control char."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line[:1] in (".", "'") else line
                     for line in out.splitlines())


def _invocation(p: argparse.ArgumentParser, a: argparse.Action) -> str:
    formatter = p._get_formatter()
    if not a.option_strings:
        return f"\\fI{_esc(formatter._metavar_formatter(a, a.dest.upper())(1)[0])}\\fR"
    metavar = "" if a.nargs == 0 else " \\fI" + _esc(
        formatter._format_args(a, a.dest.upper())) + "\\fR"
    return ", ".join(f"\\fB{_esc(o)}\\fR" for o in a.option_strings) + metavar


def _usage(p: argparse.ArgumentParser) -> str:
    usage = p.format_usage().strip()
    return usage.removeprefix("usage: ")


def manpage(parser: argparse.ArgumentParser) -> str:
    """dmrecover(8) in man(7) roff, from the parser."""
    out = [f'.TH DMRECOVER 8 "" "dmrecover {__version__}" "System Administration"',
           ".SH NAME", "dmrecover \\- " + _esc(parser.description or ""),
           ".SH SYNOPSIS", "\\fBdmrecover\\fR [\\fIGLOBAL OPTIONS\\fR] \\fIVERB\\fR "
           "[\\fIARGS\\fR]", ".SH DESCRIPTION", _esc(parser.epilog or parser.description or ""),
           ".SH GLOBAL OPTIONS"]
    for a in options(parser):
        out += [".TP", _invocation(parser, a), _esc(expanded_help(parser, a))]
    out.append(".SH VERBS")
    for name, p in walk(parser):
        out += [f".SS {_esc(name)}", _esc(p.description or ""), ".PP", ".nf",
                _esc(_usage(p)), ".fi"]
        for a in options(p):
            out += [".TP", _invocation(p, a), _esc(expanded_help(p, a))]
    out.append(_SECTIONS.rstrip("\n"))
    return "\n".join(out) + "\n"


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion function: verbs, then each verb's options and their choices."""
    cases = []
    for name, p in walk(parser):
        opts = sorted(o for a in p._actions for o in a.option_strings)
        choices = [f'            {o}) COMPREPLY=($(compgen -W "{" ".join(map(str, a.choices))}"'
                   ' -- "$cur")); return;;'
                   for a in p._actions if a.choices and a.option_strings for o in a.option_strings]
        files = [f"            {o}) COMPREPLY=($(compgen -f -- \"$cur\")); return;;"
                 for a in p._actions if a.option_strings and a.nargs != 0 and not a.choices
                 for o in a.option_strings if (a.metavar or "") in ("FILE", "DIR", "MOUNTPOINT")]
        cases.append(f'        "{name}")\n          case "$prev" in\n'
                     + "\n".join(choices + files)
                     + ("\n" if choices or files else "")
                     + f'          esac\n          opts="{" ".join(opts)}";;')
    tops = [name for name in listed_verbs(parser)]
    top_opts = sorted(o for a in parser._actions for o in a.option_strings)
    nested = sorted({name.split(" ")[0] for name, _ in walk(parser) if " " in name})
    # every verb path and every prefix of one: the words that name the verb being completed
    known = sorted({" ".join(name.split(" ")[:n]) for name, _ in walk(parser)
                    for n in range(1, len(name.split(" ")) + 1)})
    return f"""# bash completion for dmrecover, generated from its parser (dmrecover.cli.manpage)
_dmrecover() {{
    local cur prev verb="" i w opts
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{verb:+$verb }}${{COMP_WORDS[i]}}"
        case "$w" in {"|".join(f'"{k}"' for k in known)}) verb="$w";; esac
    done
    case "$verb" in
        "") COMPREPLY=($(compgen -W "{' '.join(sorted(tops))} {' '.join(top_opts)}" -- "$cur"));
            return;;
{chr(10).join(_nested_cases(parser, nested))}
{chr(10).join(cases)}
        *) opts="";;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -F _dmrecover dmrecover
"""


def _nested_cases(parser: argparse.ArgumentParser, nested: list[str]) -> Iterator[str]:
    """`dmrecover repo <TAB>` and `dmrecover repo key <TAB>`: the next word's choices."""
    for name in nested:
        seen: set[str] = set()
        for full, _ in walk(parser):
            words = full.split(" ")
            if words[0] != name:
                continue
            for depth in range(1, len(words)):
                prefix = " ".join(words[:depth])
                if prefix in seen:
                    continue
                seen.add(prefix)
                nxt = sorted({f.split(" ")[depth] for f, _ in walk(parser)
                              if f.split(" ")[:depth] == words[:depth] and len(f.split()) > depth})
                yield (f'        "{prefix}") COMPREPLY=($(compgen -W "{" ".join(nxt)}" -- '
                       '"$cur")); return;;')


def main(argv: list[str] | None = None) -> int:
    """`python -m dmrecover.cli.manpage man|bash-completion`: print it to stdout."""
    args = sys.argv[1:] if argv is None else argv
    if args not in (["man"], ["bash-completion"]):
        print("usage: python -m dmrecover.cli.manpage man|bash-completion", file=sys.stderr)
        return 2
    parser = build_parser()
    sys.stdout.write(manpage(parser) if args == ["man"] else bash_completion(parser))
    return 0


if __name__ == "__main__":
    sys.exit(main())
