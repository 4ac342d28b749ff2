"""The command line, from a dataclass: --name=value for each field, --help from each field's help
text, and every value checked against its choices or its range before anything runs.

    @dataclass
    class Config:
        dropout: float = flag(0.0, 'the dropout rate', within='[0, 1)')

Needs: nothing from the other files.
"""
import dataclasses
import signal
import sys


def flag(default, text, choices=(), within=''):
    """A dataclass field that is also a flag: its --help text, and the values it may take, as
    choices or as an interval (within='[1, inf)': at least 1; '(0, 1]': above 0, at most 1)."""
    return dataclasses.field(default=default,
                             metadata=dict(help=text, choices=choices, within=within))


def number(text):  # an interval's end: '1', 'inf', '2**63'
    base, _, power = text.partition('**')
    return float(base) ** float(power or 1)


def in_range(value, within):
    low, high = (number(end.strip()) for end in within[1:-1].split(','))
    above_low = value >= low if within[0] == '[' else value > low
    below_high = value <= high if within[-1] == ']' else value < high
    return above_low and below_high


def one_line(message):  # an error's one line: a newline in it (a path may hold one) escaped
    return message.replace('\n', '\\n')


def rule(field):  # what --help and the error messages say a flag may be
    choices, within = field.metadata['choices'], field.metadata['within']
    if choices:
        return 'one of ' + ', '.join(repr(c) if c == '' else c for c in choices)
    return f"in {within}" if within else ''


def parse(prog, argv, cfg, presets=None):
    """Set the fields of the dataclass `cfg` from argv (a preset's values first, then the flags on
    top) and check each; a bad flag exits with one line that names it and what it may be."""
    presets = presets or {}
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if '-h' in argv or '--help' in argv:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--help | head`: end quietly, as tools do
        print(f"usage: python {prog} [--name=value ...]   (--flag alone means --flag=True)\n")
        for f in fields.values():
            allowed = rule(f)
            allowed = f"; {allowed}" if allowed else ''
            print(f"  --{f.name}={getattr(cfg, f.name)!r}\n      {f.metadata['help']}{allowed}")
        if presets:
            print(f"\npresets (--preset=NAME, then your flags on top): {', '.join(presets)}")
        sys.exit(0)
    pairs = []
    for arg in argv:
        name, eq, value = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or name not in fields:
            sys.exit(f"{prog}: unknown flag {arg!r}: see --help for the flags")
        pairs.append((name, value if eq else 'True'))
    preset = dict(pairs).get('preset')
    if preset is not None and preset not in presets:
        sys.exit(f"{prog}: unknown preset {preset!r}: choose one of {', '.join(presets)}")
    for name, value in list(presets.get(preset, {}).items()) + pairs:
        kind = fields[name].type
        try:
            if kind is bool:  # bool('False') is True: read the word
                value = {'true': True, 'false': False, '1': True, '0': False}[str(value).lower()]
            setattr(cfg, name, kind(value))
        except (ValueError, KeyError):
            sys.exit(f"{prog}: --{name}={value!r} is not a valid {kind.__name__}")
    for f in fields.values():
        value, choices, within = getattr(cfg, f.name), f.metadata['choices'], f.metadata['within']
        if choices and value not in choices:
            sys.exit(f"{prog}: --{f.name}={value!r} is not {rule(f)}")
        if within and not in_range(value, within):
            sys.exit(f"{prog}: --{f.name}={value!r} must be {rule(f)}")
    return cfg
