"""``malai ssh`` (issue 19): ssh's command line and command semantics, with the real rsync, git, scp and sftp.

Unit tests for the command-string split (against dash and bash), the option parser (with the argv
each tool really passes) and the machine's decision; then one loopback cluster for the class with
the installed ``malai``/``malai-ssh``: web01 lets the laptop run anything and a shell, web02 lets it
run commands but no shell and no files, web03 is the one whose daemon the partition tests stop."""

import atexit
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.acl import Acl, Denied
from malai.cli import ssh
from malai.config.cluster import parse_cluster, render_cluster
from malai.config.machine import parse_machine_config, personalize, render_machine_config
from malai.config.models import ClusterManager, Command, Machine, MachineConfig
from malai.peer.execution import BadRequest, prepare
from malai.peer.shellwords import NeedsShell, split_command
from tests.helpers import KEYS, LoopbackCluster, cluster_text, run_malai, wait_for
from tests.test_exec_hardening import processes_with

MALAI = str(Path(sys.executable).with_name("malai"))
MALAI_SSH = str(Path(sys.executable).with_name("malai-ssh"))
HOME = pwd.getpwuid(os.getuid()).pw_dir


class SplitTests(SynchronousTestCase):
    """The command string as argv: exactly what a shell would make of it, or NeedsShell."""

    def test_plain_words(self):
        cases = {
            "git-upload-pack '/srv/repo.git'": ["git-upload-pack", "/srv/repo.git"],
            r"rsync --server -vlogDtpre.iLsfxCIvu . /tmp/a\ b/": ["rsync", "--server", "-vlogDtpre.iLsfxCIvu", ".",
                                                                 "/tmp/a b/"],
            'a "b \\"c\\" \\$d" \'e\'"f"g  \t h': ["a", 'b "c" $d', "efg", "h"],
            "echo a~b c= d=e '' \"\"": ["echo", "a~b", "c=", "d=e", "", ""],
            "nice rsync --server": ["nice", "rsync", "--server"],
            "echo a#b": ["echo", "a#b"],
            "": [],
        }
        for line, words in cases.items():
            self.assertEqual(split_command(line).words, words, line)

    def test_tilde_paths_are_the_home(self):
        split = split_command("rsync --server . ~/a\\ b/ ~ '~/q' x~")
        self.assertEqual(split.expanded("/home/u"), ["rsync", "--server", ".", "/home/u/a b/", "/home/u", "~/q", "x~"])

    def test_what_needs_a_shell(self):
        for line in ("ls *.txt", "a | b", "a; b", "a && b", "a > f", "a < f", "echo $HOME", "echo `id`",
                     'echo "$x"', "a\nb", "(a)", "a &", "echo {a,b}", "! a", "echo # c", "FOO=1 env",
                     "cd /tmp", "exec rsync", "ls ~root", "~/bin/x", "echo a=~/b", "echo 'open", 'echo "open',
                     "echo \\", "echo ?", "echo [ab]"):
            with self.assertRaises(NeedsShell, msg=line):
                split_command(line)

    @settings(max_examples=150, deadline=None)
    @given(st.text(alphabet="ab /.-='\"\\~#$*;|\t\né", max_size=24))
    def test_same_words_as_dash_and_bash(self, line):
        try:
            words = split_command(line).expanded("/home/u")
        except NeedsShell:
            return
        for shell in ("dash", "bash"):
            if shutil.which(shell) is None:
                continue
            out = subprocess.run([shell, "-c", "printf '%s\\0' x " + line], capture_output=True,
                                 env={"HOME": "/home/u", "PATH": os.environ["PATH"]})
            self.assertEqual(out.returncode, 0, (shell, line, out.stderr))
            self.assertEqual(out.stdout.decode().split("\0")[1:-1], words, (shell, line))


class ParseTests(SynchronousTestCase):
    """The argv each tool really hands its ssh program (recorded from the tools themselves)."""

    def test_sftp_and_scp(self):
        call = ssh.parse(["-oForwardX11 no", "-oPermitLocalCommand no", "-oClearAllForwardings yes",
                          "-oForwardAgent no", "-s", "--", "web01.company", "sftp"])
        self.assertEqual((call.host, call.subsystem, call.words), ("web01.company", True, ["sftp"]))
        call = ssh.parse(["-x", "-oPermitLocalCommand=no", "-oClearAllForwardings=yes", "-oRemoteCommand=none",
                          "-oRequestTTY=no", "-oForwardAgent=no", "--", "web01.company", "scp -t /tmp/a b"])
        self.assertEqual((call.words, call.no_tty), (["scp -t /tmp/a b"], True))

    def test_rsync_and_git(self):
        call = ssh.parse(["web01.company", "rsync", "--server", "-vlogDtpre.iLsfxCIvu", ".", "/tmp/a\\ b/"])
        self.assertEqual(call.words, ["rsync", "--server", "-vlogDtpre.iLsfxCIvu", ".", "/tmp/a\\ b/"])
        call = ssh.parse(["-G", "-o", "SendEnv=GIT_PROTOCOL", "-p", "2222", "git@web01.company"])
        self.assertEqual((call.print_config, call.user, call.port, call.host), (True, "git", "2222", "web01.company"))
        call = ssh.parse(["-o", "SendEnv=GIT_PROTOCOL", "web01.company", "git-upload-pack '/srv/repo.git'"])
        self.assertEqual(call.words, ["git-upload-pack '/srv/repo.git'"])

    def test_options_after_the_host_and_uri(self):
        call = ssh.parse(["ssh://u@web01.company:22", "-tt", "-o", "ConnectTimeout=1m30s", "--", "-x"])
        self.assertEqual((call.host, call.user, call.tty, call.opts.connect_timeout, call.words),
                         ("web01.company", "u", 2, 90.0, ["-x"]))
        call = ssh.parse(["-l", "a", "b@web01.company", "echo", "-t"])  # -l wins; options stop at the command
        self.assertEqual((call.user, call.words, call.tty), ("a", ["echo", "-t"], 0))

    def test_refusals_and_unknowns(self):
        for argv in (["-L", "80:x:80", "h.c"], ["-oLocalForward=1 x:1", "h.c"], ["-N", "h.c"], ["-Z", "h.c"],
                     ["-o", "ConnectTimeout=soon", "h.c"], ["-p"]):
            with self.assertRaises(SystemExit, msg=argv) as caught:
                ssh.parse(argv)
            self.assertIsInstance(caught.exception.code, str)
        call = ssh.parse(["-4", "-A", "-C", "-i", "key", "-F", "/dev/null", "-o", "ServerAliveInterval=5", "h.c"])
        self.assertEqual(len(call.ignored), 6)


def _machine_config(**machine) -> MachineConfig:
    caller = KEYS["laptop"].id52
    commands = {"showname": Command("showname", "echo name", caller),
                "backup": Command("backup", "echo backup", caller, username="nobody")}
    m = Machine(name="web01", id52=KEYS["web01"].id52, commands=commands, **machine)
    return MachineConfig(ClusterManager(KEYS["cm"].id52, "company"), m, {"laptop": caller})


class PrepareTests(SynchronousTestCase):
    """What the machine decides for a command string: the split argv is what is judged and what runs."""

    caller = KEYS["laptop"].id52

    def prepare(self, config, line=None, subsystem=None, argv=()):
        return prepare(config, "company", self.caller, list(argv), False, "xterm", 24, 80, None, line, subsystem)

    def test_plain_words_are_judged_and_run_as_argv(self):
        config = _machine_config(allow_from=self.caller)
        request = self.prepare(config, "git-upload-pack '/srv/a b.git'")
        self.assertEqual(request.command, ["git-upload-pack", "/srv/a b.git"])
        self.assertIn("machine.web01.allow_from", str(request.decision))
        self.assertEqual(self.prepare(config, "ls ~/x").command, ["ls", HOME + "/x"])

    def test_a_command_entry_is_not_bypassed_through_the_string(self):
        config = _machine_config()  # no allow_from, no shell: only the command entries
        self.assertEqual(self.prepare(config, "showname").command, ["echo", "name"])
        for line in ("showname /etc/shadow", "showname ''", "'showname' x", "showname\\ x", "showname;id",
                     "showname | cat", "showname $(id)"):
            with self.assertRaises(Denied, msg=line):
                self.prepare(config, line)

    def test_a_string_needing_a_shell(self):
        config = _machine_config(allow_from=self.caller, allow_shell=KEYS["web01"].id52)
        with self.assertRaises(Denied) as caught:
            self.prepare(config, "ls *.txt")
        self.assertEqual(caught.exception.for_caller(), "permission denied: denied by machine.web01.allow_shell: "
                         "the command needs a shell (an unquoted '*'), which you may not start here")
        self.assertEqual(self.prepare(_machine_config(allow_from=self.caller), "ls *.txt").command[1:],
                         ["-c", "ls *.txt"])  # allow_shell defaults to allow_from
        config = _machine_config(allow_shell=self.caller)
        request = self.prepare(config, "backup; id")  # as the machine's user: the entry's is not the shell's
        self.assertEqual(request.command[1:], ["-c", "backup; id"])
        self.assertEqual(request.user, pwd.getpwuid(os.getuid()).pw_name)

    def test_subsystem_and_allow_files(self):
        with self.assertRaises(Denied) as caught:
            self.prepare(_machine_config(allow_from=self.caller, allow_shell=KEYS["web01"].id52), subsystem="sftp")
        self.assertIn("allow_shell (allow_files defaults to it)", caught.exception.for_caller())
        config = _machine_config(allow_files=self.caller)
        if not any(os.access(p, os.X_OK) for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")):
            raise self.skipTest("no sftp server installed")
        self.assertTrue(self.prepare(config, subsystem="sftp").command[0].endswith("sftp-server"))
        with self.assertRaises(Denied):
            self.prepare(config, "id")

    def test_bad_requests(self):
        config = _machine_config(allow_from=self.caller)
        for kw in ({"line": "a\x00b"}, {"line": "id", "argv": ["id"]}, {"subsystem": "x11"},
                   {"subsystem": "sftp", "line": "id"}):
            with self.assertRaises(BadRequest, msg=kw):
                self.prepare(config, **kw)


class AllowFilesTests(SynchronousTestCase):
    """``[machine.X] allow_files``: parsed, rendered, expanded for the machine, listed in callers' directories."""

    def setUp(self):
        alice = KEYS["alice"].id52
        text = cluster_text().replace(f'allow_shell = "{alice}"\n', f'allow_shell = "{alice}"\nallow_files = "web01"\n')
        self.config = parse_cluster(text)

    def test_round_trips(self):
        self.assertEqual(self.config.machines["db01"].allow_files, "web01")
        self.assertEqual(parse_cluster(render_cluster(self.config)), self.config)
        db01 = personalize(self.config, "db01")
        self.assertEqual(db01.machine.allow_files, KEYS["web01"].id52)
        self.assertEqual(parse_machine_config(render_machine_config(db01)), db01)

    def test_decisions_and_directory(self):
        acl, db01 = Acl.for_cluster(self.config), self.config.machines["db01"]
        self.assertTrue(acl.can_use_files(db01, KEYS["web01"].id52))
        self.assertFalse(acl.can_use_files(db01, KEYS["alice"].id52))  # a shell, but not files: allow_files is set
        entry = personalize(self.config, "web01").directory["db01"]  # files only: still in web01's directory
        self.assertEqual((entry.files, entry.exec, entry.shell), (True, False, False))
        web01 = self.config.machines["web01"]  # no allow_files, no allow_shell: allow_from decides
        self.assertIn("allow_files and allow_shell default to it", str(acl.can_use_files(web01, KEYS["alice"].id52)))


def tree(root: Path) -> dict:
    """Every entry under ``root``: a file's sha256, a symlink's target, or "dir"."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class SshEndToEndTests(TestCase):
    """One cluster for the class (trial has no setUpClass): a manager, web01-03 and a laptop (the caller)."""

    cluster = None

    def setUp(self):
        if SshEndToEndTests.cluster is None:
            SshEndToEndTests._build()

    @classmethod
    def _build(cls):
        cls.dir = Path(tempfile.mkdtemp(prefix="malai-ssh-", dir="/tmp"))
        atexit.register(shutil.rmtree, cls.dir, True)
        (cls.dir / "name").write_text("web02-name\n")
        (cls.dir / "secret").write_text("TOP-SECRET\n")

        def config(ids, ports):
            text = '\n[group.admins]\nmembers = "web01"\n'
            for name, extra in (("web01", 'allow_shell = "laptop"\n'), ("web02", 'allow_shell = "admins"\n'),
                                ("web03", "")):
                text += (f'\n[machine.{name}]\nid52 = "{ids[name]}"\naddrs = ["127.0.0.1:{ports[name]}"]\n'
                         f'allow_from = "laptop"\n{extra}')
            text += f'\n[machine.web02.command.showname]\ncommand = "cat {cls.dir}/name"\nallow_from = "laptop"\n'
            return text + f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'

        cls.cluster = LoopbackCluster(("web01", "web02", "web03", "laptop"), config)
        cls.homes = cls.cluster.homes
        cls.env = dict(os.environ, MALAI_HOME=str(cls.homes["laptop"].root))

    def run_(self, *args, **kw):
        return run_malai(self.homes["laptop"].root, *args, **kw)

    def tool(self, *argv, cwd=None, env=None):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd, env={**self.env, **(env or {})})
        self.assertEqual(r.returncode, 0, f"{argv}:\n{r.stdout}\n{r.stderr}")
        return r

    def audit(self, name):
        path = self.homes[name].root / "log" / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def sample_tree(self) -> Path:
        src = Path(self.mktemp())
        (src / "dir with spaces").mkdir(parents=True)
        (src / "dir with spaces" / "a file").write_text("hello\n")
        (src / "~tilde").write_bytes(os.urandom(1000))
        (src / "big").write_bytes(os.urandom(300_000))
        (src / "link").symlink_to("dir with spaces/a file")
        return src

    def stop(self, name):
        """Freeze ``name``'s daemon (its links stall as in a partition) until the test ends."""
        pid = self.homes[name].pid()
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)

    # -- command semantics ------------------------------------------------------------------------
    def test_plain_words_run_with_no_shell(self):
        r = self.run_("ssh", "web02.company", "echo", "'a  b'", "c\\ \\ d")  # web02 gives the laptop no shell
        self.assertEqual((r.stdout, r.returncode), ("a  b c  d\n", 0), r.stderr)
        record = [a for a in self.audit("web02") if a["argv"][:1] == ["echo"]][-1]
        self.assertEqual((record["argv"], record["command"]), (["echo", "a  b", "c  d"], ["echo", "a  b", "c  d"]))
        r = self.run_("web02.company", "echo", "'a  b'")  # the main form keeps its exact argv
        self.assertEqual(r.stdout, "'a  b'\n")

    def test_a_string_needing_a_shell(self):
        r = self.run_("ssh", "web02.company", "echo $HOME | tr a-z A-Z")
        self.assertEqual(r.returncode, 126)
        self.assertEqual(r.stderr, "malai: permission denied: denied by machine.web02.allow_shell: the command needs "
                         "a shell (an unquoted '$'), which you may not start here\n")
        r = self.run_("ssh", "web01.company", "echo $HOME | tr a-z A-Z; exit 3")
        self.assertEqual((r.stdout, r.returncode), (HOME.upper() + "\n", 3), r.stderr)

    def test_a_command_entry_is_not_bypassed_through_the_string(self):
        r = self.run_("ssh", "web02.company", "showname")
        self.assertEqual((r.stdout, r.returncode), ("web02-name\n", 0), r.stderr)
        for words in ([f"showname {self.dir}/secret"], ["showname", f"'{self.dir}/secret'"], ["showname;id"],
                      [f"showname <{self.dir}/secret"]):
            r = self.run_("ssh", "web02.company", *words)
            self.assertEqual(r.returncode, 126, (words, r.stderr))
            self.assertNotIn("TOP-SECRET", r.stdout)
            self.assertIn("permission denied: denied by machine.web02.", r.stderr)

    def test_refusals_name_machines_not_id52s(self):
        from malai.cli.remote import named

        ids, home = self.cluster.ids, self.homes["laptop"].root
        self.assertEqual(named(home, "company", f"cannot reach {ids['web03']}: tried relay:{self.cluster.cm_id52}"),
                         "cannot reach web03: tried relay:manager")

    def test_dash_G_as_git_expects(self):
        r = self.run_("ssh", "-G", "-o", "SendEnv=GIT_PROTOCOL", "-p", "2222", "git@web01.company")
        self.assertEqual(r.returncode, 0)
        self.assertIn("hostname web01.company\n", r.stdout)

    # -- the real tools ---------------------------------------------------------------------------
    def test_rsync_push_and_pull(self):
        src = self.sample_tree()
        remote_home = Path(HOME) / f"malai-ssh-test-{os.getpid()}"
        self.addCleanup(shutil.rmtree, remote_home, True)
        rsh = ("-e", f"{MALAI} ssh")
        for dest, where in ((f"web01.company:{self.dir}/push to/", self.dir / "push to"),
                            (f"web01.company:~/{remote_home.name}/", remote_home)):
            self.tool("rsync", "-a", *rsh, f"{src}/", dest)
            self.assertEqual(tree(where), tree(src))
        (src / "big").unlink()
        (src / "new file").write_text("new\n")
        self.tool("rsync", "-a", "--delete", *rsh, f"{src}/", f"web01.company:~/{remote_home.name}/")
        self.assertEqual(tree(remote_home), tree(src))
        pulled = Path(self.mktemp())
        self.tool("rsync", "-a", *rsh, f"web01.company:~/{remote_home.name}/", f"{pulled}/")
        self.assertEqual(tree(pulled), tree(src))
        self.tool("rsync", "-a", *rsh, "--rsync-path=nice rsync", f"web01.company:{self.dir}/push to/dir with spaces",
                  f"{pulled}/")
        self.assertEqual(tree(pulled / "dir with spaces"), tree(src / "dir with spaces"))

    def test_rsync_interrupted_then_resumed(self):
        src = Path(self.mktemp())
        src.mkdir()
        data = os.urandom(4_000_000)
        (src / "big").write_bytes(data)
        dest = self.dir / "resume"
        argv = ["rsync", "-a", "--partial", "--stats", "-e", f"{MALAI} ssh", str(src / "big"), f"web01.company:{dest}/"]
        slow = subprocess.Popen([*argv[:1], "--bwlimit=500", *argv[1:]], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=self.env)
        wait_for(lambda: (dest / "big").exists() or any(dest.glob(".big.*")), what="the transfer to start")
        time.sleep(1)
        slow.terminate()
        slow.wait(30)
        wait_for(lambda: (dest / "big").exists() and 0 < (dest / "big").stat().st_size < len(data),
                 what="the partial file kept by the machine's rsync")
        r = self.tool(*argv)
        literal = int(r.stdout.split("Literal data: ")[1].split()[0].replace(",", ""))
        self.assertLess(literal, len(data))  # the kept part was not sent again
        self.assertEqual(hashlib.sha256((dest / "big").read_bytes()).digest(), hashlib.sha256(data).digest())

    def test_git_clone_and_push(self):
        bare = self.dir / "repo.git"
        self.tool("git", "init", "-q", "--bare", "-b", "main", str(bare))
        work = Path(self.mktemp())
        self.tool("git", "init", "-q", "-b", "main", str(work))
        (work / "file").write_text("one\n")
        ident = ["-c", "user.email=t@example.com", "-c", "user.name=t"]
        self.tool("git", *ident, "-C", str(work), "commit", "-qam", "one", "--allow-empty")
        self.tool("git", "-C", str(work), "add", "file")
        self.tool("git", *ident, "-C", str(work), "commit", "-qm", "file")
        self.tool("git", "-C", str(work), "push", "-q", f"web01.company:{bare}", "main",
                  env={"GIT_SSH_COMMAND": f"{MALAI} ssh"})
        clone = Path(self.mktemp())
        self.tool("git", "-c", f"core.sshCommand={MALAI} ssh", "clone", "-q", f"ssh://git@web01.company{bare}",
                  str(clone))
        self.assertEqual((clone / "file").read_text(), "one\n")
        (clone / "file").write_text("two\n")
        self.tool("git", *ident, "-C", str(clone), "commit", "-qam", "two")
        self.tool("git", "-C", str(clone), "push", "-q", env={"GIT_SSH_COMMAND": f"{MALAI} ssh"})
        self.tool("git", "-C", str(work), "pull", "-q", f"web01.company:{bare}", "main",
                  env={"GIT_SSH_COMMAND": f"{MALAI} ssh"})
        self.assertEqual((work / "file").read_text(), "two\n")

    def test_scp_and_sftp(self):
        src = self.sample_tree()
        out = self.dir / "scp"
        out.mkdir(exist_ok=True)
        want = hashlib.sha256((src / "big").read_bytes()).hexdigest()
        local = Path(self.mktemp())
        local.mkdir()
        for mode in ([], ["-O"]):  # SFTP mode (the sftp subsystem), then the legacy scp protocol
            name = f"put{len(mode)}"
            self.tool("scp", *mode, "-S", MALAI_SSH, str(src / "big"), f"web01.company:{out}/{name}")
            self.tool("scp", *mode, "-S", MALAI_SSH, f"web01.company:{out}/{name}", str(local / name))
            self.assertEqual({hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / name, local / name)}, {want})
        self.tool("scp", "-r", "-S", MALAI_SSH, str(src), f"web01.company:{out}/tree")
        self.assertEqual(tree(out / "tree"), {**tree(src), "link": tree(src)["dir with spaces/a file"]})  # scp follows links
        batch = f"put {src}/big {out}/sftp-put\nget {out}/sftp-put {local}/sftp-get\n"
        r = subprocess.run(["sftp", "-S", MALAI_SSH, "-b", "-", "web01.company"], input=batch, capture_output=True,
                           text=True, timeout=60, env=self.env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(hashlib.sha256((local / "sftp-get").read_bytes()).hexdigest(), want)
        r = subprocess.run(["scp", "-S", MALAI_SSH, str(src / "big"), f"web02.company:{out}/denied"],
                           capture_output=True, text=True, timeout=60, env=self.env)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("denied by machine.web02.allow_shell (allow_files defaults to it)", r.stderr)
        self.assertFalse((out / "denied").exists())

    def test_malai_cp(self):
        src = self.sample_tree()
        self.tool(MALAI, "cp", "-r", str(src), f"web01.company:{self.dir}/cp")
        followed = {**tree(src), "link": tree(src)["dir with spaces/a file"]}  # scp follows links
        self.assertEqual(tree(self.dir / "cp"), followed)
        back = Path(self.mktemp())
        self.tool(MALAI, "cp", "-r", "-q", f"web01.company:{self.dir}/cp", str(back))
        self.assertEqual(tree(back), followed)
        r = self.run_("cp", str(src / "big"), f"web02.company:{self.dir}/cp-denied")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("malai: permission denied: denied by machine.web02.allow_shell (allow_files defaults to it)",
                      r.stderr)
        self.assertEqual(self.run_("cp", "only-one").returncode, 2)

    # -- never hang -------------------------------------------------------------------------------
    def test_pipe_into_a_login_shell_ends_at_eof(self):
        me = pwd.getpwuid(os.getuid())
        try:
            subprocess.run([me.pw_shell, "-lc", "true"], capture_output=True, timeout=3, check=True,
                           env={"HOME": me.pw_dir, "PATH": os.environ["PATH"]})
        except (subprocess.SubprocessError, OSError):
            raise self.skipTest(f"{me.pw_name}'s login profile on this machine is slow or fails") from None
        script = "echo from-stdin; test -t 0 || echo no-terminal; exit 4\n"
        for argv in ([MALAI, "web01.company"], [MALAI, "ssh", "web01.company"]):
            r = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30, env=self.env)
            self.assertEqual((r.stdout, r.returncode), ("from-stdin\nno-terminal\n", 4), r.stderr)
        r = subprocess.run([MALAI, "web01.company"], input="echo ends\n", capture_output=True, text=True,
                           timeout=30, env=self.env)  # no exit: the shell ends at EOF
        self.assertEqual((r.stdout, r.returncode), ("ends\n", 0), r.stderr)

    def test_unreachable_machine_exits_255_within_the_connect_timeout(self):
        self.stop("web03")
        port = self.cluster.ports["web03"]
        for argv in (["ssh", "-o", "ConnectTimeout=2", "web03.company", "true"],
                     ["--connect-timeout", "2", "web03.company", "true"], ["--timeout", "2", "web03.company", "true"]):
            start = time.monotonic()
            r = self.run_(*argv)
            elapsed = time.monotonic() - start
            self.assertEqual(r.returncode, 255, r.stderr)
            self.assertLess(elapsed, 4.5, argv)
            self.assertIn("web03.company did not answer within 2s", r.stderr)
            self.assertIn(f"tried 127.0.0.1:{port}", r.stderr)
        start = time.monotonic()
        r = self.run_("--connect-timeout", "2", "web0[13].company", "echo", "hi")  # fan-out: the others finish
        self.assertLess(time.monotonic() - start, 4.5)
        self.assertEqual((r.stdout, r.returncode), ("web01: hi\n", 1))
        self.assertIn("web03: malai: did not answer within 2s", r.stderr)

    def test_timeout_bounds_a_session_whose_machine_stalls(self):
        proc = subprocess.Popen([MALAI, "--timeout", "2", "web03.company", "sh", "-c", "echo started; sleep 30"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        start = time.monotonic()
        self.assertEqual(proc.stdout.readline(), b"started\n")
        self.stop("web03")  # the machine can no longer send its exit 124
        _, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 124, err)
        self.assertLess(time.monotonic() - start, 2 + 3 + 1.5)
        self.assertIn(b"--timeout passed and web03.company did not end the command", err)

    def test_second_interrupt_ends_the_client(self):
        word = f"{os.getpid()}.5"
        proc = subprocess.Popen([MALAI, "ssh", "web01.company", f"sh -c 'trap \"\" INT; echo started; sleep {word}'"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        self.assertEqual(proc.stdout.readline(), b"started\n")
        proc.send_signal(signal.SIGINT)  # goes to the command, which ignores it
        time.sleep(0.5)
        self.assertIsNone(proc.poll())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, 130)
        self.assertEqual(err, b"\r\nmalai: SIGINT: left web01.company (the command there is hung up)\n")
        wait_for(lambda: not processes_with(f"sleep {word}"), what="the remote command to be hung up")

    def test_a_reader_that_goes_away(self):
        for argv in ([MALAI, "ssh", "web01.company", "yes"], [MALAI, "web01.company", "yes"]):
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=self.env)
            self.assertEqual(proc.stdout.read(4), b"y\ny\n")
            proc.stdout.close()  # as `| head` does
            self.assertEqual(proc.wait(10), 141)
            self.assertEqual(proc.stderr.read(), b"")
            proc.stderr.close()

    def test_nonblocking_stdout_keeps_every_byte(self):
        data = os.urandom(8 * 1024 * 1024)
        (self.dir / "data").write_bytes(data)
        out_r, out_w = socket.socketpair()
        for s in (out_r, out_w):
            s.setblocking(False)  # as rsync hands its remote shell
        proc = subprocess.Popen([MALAI, "ssh", "web01.company", f"cat {self.dir}/data"], stdin=subprocess.DEVNULL,
                                stdout=out_w.fileno(), env=self.env)
        out_w.close()
        got = bytearray()
        out_r.setblocking(True)
        out_r.settimeout(30)
        while chunk := out_r.recv(16384):
            got += chunk
            time.sleep(0.0002)  # a slow reader: the client meets EAGAIN
        self.assertEqual(proc.wait(30), 0)
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(data).digest())
