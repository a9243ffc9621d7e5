"""Who may do what: ``allow_from`` expressions and explained decisions.

An expression is a comma-separated list of terms: ``*`` (every member of the
cluster), an ID52, a machine name or a group name; groups nest. Default deny:
an absent expression allows nobody. Every decision carries the rule that
decided it and why, so a refusal can be explained to the person refused.
"""

from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import attrs

from malai.config.models import ClusterConfig, Machine, MachineConfig
from malai.errors import MalaiError
from malai.identity import ID52Error, parse_id52

__all__ = ["Acl", "Decision", "Denied", "expression_terms", "run_as"]


def expression_terms(expr: str) -> List[str]:
    """The terms of an ``allow_from`` expression; an empty one is allowed and names nobody."""
    return [t.strip() for t in expr.split(",") if t.strip()]


@attrs.frozen
class Decision:
    """An allow or deny, with the rule that decided it and why."""

    allowed: bool
    rule: str
    reason: str
    brief: str = ""  # the reason as a remote caller may see it: naming no other member

    def __bool__(self) -> bool:
        return self.allowed

    def __str__(self) -> str:
        return f"{'allowed' if self.allowed else 'denied'} by {self.rule}: {self.reason}"

    def for_caller(self) -> str:
        """The decision told to the caller: the rule, and the reason only if it names no one else."""
        return f"{'allowed' if self.allowed else 'denied'} by {self.rule}" + (f": {self.brief}" if self.brief else "")


class Acl:
    """Resolves expressions against a cluster's groups and member names."""

    def __init__(self, groups: Mapping[str, str], names: Mapping[str, str], everyone: Sequence[str]):
        self.groups = dict(groups)
        self.names = dict(names)  # machine name -> ID52
        self.everyone = frozenset(everyone)
        self._name_of = {v: k for k, v in self.names.items()}

    @classmethod
    def for_cluster(cls, config: ClusterConfig) -> "Acl":
        names = {m.name: m.id52 for m in config.machines.values()}
        return cls(config.groups, names, [config.manager.id52, *names.values()])

    @classmethod
    def for_machine(cls, config: MachineConfig) -> "Acl":
        """A machine's view: expressions there are already expanded to ID52s."""
        return cls({}, config.callers, [])

    def name_of(self, id52: str) -> str:
        name = self._name_of.get(id52)
        return f"{name} ({id52})" if name else id52

    # -- resolution ---------------------------------------------------------
    def term_problems(self, expr: str) -> List[str]:
        """Terms of ``expr`` that name nothing: unknown names and malformed ID52s."""
        out = []
        for term in expression_terms(expr):
            if term == "*" or term in self.groups or term in self.names:
                continue
            if len(term) == 52:
                try:
                    parse_id52(term)
                    continue
                except ID52Error as e:
                    out.append(str(e))
                    continue
            out.append(f"unknown name {term!r}: not a group, a machine, '*' or an ID52")
        return out

    def cycles(self) -> List[Tuple[str, str]]:
        """Each group cycle once, as (first group in it, ``a → b → a``)."""
        found: Dict[Tuple[str, ...], Tuple[str, str]] = {}

        def visit(group: str, chain: Tuple[str, ...]) -> None:
            if group in chain:
                loop = chain[chain.index(group):]
                key = tuple(sorted(loop))
                found.setdefault(key, (loop[0], " → ".join(loop + (group,))))
                return
            for term in expression_terms(self.groups[group]):
                if term in self.groups:
                    visit(term, chain + (group,))

        for group in self.groups:
            visit(group, ())
        return list(found.values())

    def members(self, expr: Optional[str]) -> Dict[str, str]:
        """Each ID52 the expression allows, with how it got in."""
        out: Dict[str, str] = {}
        for term in expression_terms(expr or ""):
            for id52, how in self._walk(term, ()):
                out.setdefault(id52, how)
        return out

    def _walk(self, term: str, chain: Tuple[str, ...]) -> Iterator[Tuple[str, str]]:
        via = " → ".join(chain + (term,))
        if term == "*":
            for id52 in sorted(self.everyone):
                yield id52, f"'*' (every member) via {' → '.join(chain)}" if chain else "'*' (every member)"
        elif term in self.groups:
            if term not in chain:
                for sub in expression_terms(self.groups[term]):
                    yield from self._walk(sub, chain + (term,))
        elif term in self.names:
            yield self.names[term], f"machine {via}"
        else:
            try:
                yield parse_id52(term), f"ID52 listed via {' → '.join(chain)}" if chain else "ID52 listed"
            except ID52Error:
                pass

    # -- decisions ----------------------------------------------------------
    def check(self, rule: str, expr: Optional[str], caller: str) -> Decision:
        """Whether ``caller`` is in ``expr``, explained as ``rule``."""
        if expr is None:
            reason = f"{rule} is not set, so nobody is allowed"
            return Decision(False, rule, reason, reason)
        how = self.members(expr).get(caller)
        if how is None:
            return Decision(False, rule, f"{self.name_of(caller)} is not in {rule} = {expr!r}", "you are not in it")
        return Decision(True, rule, f"{self.name_of(caller)} matched {how}")

    def can_run(self, machine: Machine, caller: str, argv: Sequence[str]) -> Decision:
        """Running ``argv`` (empty: an interactive shell) on ``machine``.

        A command entry takes extra words only with ``args = true`` (appended to its argv)
        or ``shell = true`` (positional parameters of its script)."""
        prefix = f"machine.{machine.name}"
        if not argv:
            if machine.allow_shell is not None:
                return self.check(f"{prefix}.allow_shell", machine.allow_shell, caller)
            return self.check(f"{prefix}.allow_from (allow_shell defaults to it)", machine.allow_from, caller)
        entry = machine.commands.get(argv[0])
        if entry is None:
            return self.check(f"{prefix}.allow_from", machine.allow_from, caller)
        decision = self.check(f"{prefix}.command.{entry.name}.allow_from", entry.allow_from, caller)
        if decision and len(argv) > 1 and not (entry.args or entry.shell):
            reason = f"command {entry.name} runs exactly {entry.command!r}: it takes no arguments (args is not set)"
            return Decision(False, f"{prefix}.command.{entry.name}.args", reason,
                            f"command {entry.name} takes no arguments")
        return decision

    def can_run_in_shell(self, machine: Machine, caller: str, why: str) -> Decision:
        """A command string that needs a shell (``why``: what in it does): where a login shell may run."""
        decision = self.can_run(machine, caller, [])
        if decision:
            return decision
        need = f"the command needs a shell ({why}), which you may not start here"
        return attrs.evolve(decision, reason=f"{decision.reason}; {need}", brief=need)

    def can_use_files(self, machine: Machine, caller: str) -> Decision:
        """The machine's files through its sftp server: ``allow_files``, default ``allow_shell``."""
        prefix = f"machine.{machine.name}"
        if machine.allow_files is not None:
            return self.check(f"{prefix}.allow_files", machine.allow_files, caller)
        if machine.allow_shell is not None:
            return self.check(f"{prefix}.allow_shell (allow_files defaults to it)", machine.allow_shell, caller)
        return self.check(f"{prefix}.allow_from (allow_files and allow_shell default to it)", machine.allow_from,
                          caller)

    def can_reach(self, machine: Machine, kind: str, service: str, caller: str) -> Decision:
        """Reaching the ``kind`` (``tcp`` or ``http``) service ``service`` on ``machine``."""
        services = machine.tcp if kind == "tcp" else machine.http
        rule = f"machine.{machine.name}.{kind}.{service}.allow_from"
        if service not in services:
            return Decision(False, rule, f"machine {machine.name} has no {kind} service {service!r}")
        return self.check(rule, services[service].allow_from, caller)

    def can_edit_config(self, editors: Optional[str], caller: str) -> Decision:
        return self.check("cluster_manager.config_editors", editors, caller)


def run_as(machine: Machine, argv: Sequence[str]) -> Optional[str]:
    """The user ``argv`` runs as: the command's, else the machine's; None means the daemon's."""
    entry = machine.commands.get(argv[0]) if argv else None
    if entry is not None and entry.username:
        return entry.username
    return machine.username


class Denied(MalaiError):
    def __init__(self, decision: Decision):
        self.decision = decision
        super().__init__(f"permission denied: {decision}")

    def for_caller(self) -> str:
        return f"permission denied: {self.decision.for_caller()}"
