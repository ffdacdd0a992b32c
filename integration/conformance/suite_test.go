// Package conformance drives containerd's snapshotter conformance suite
// (snapshots/testsuite.SnapshotterSuite of containerd 1.6, as packaged by Debian) against
// a proxy snapshotter process: the one containerd would reach through [proxy_plugins].
//
// $CONFORMANCE_SNAPSHOTTER is a JSON array, the snapshotter's command line without its
// last arguments; each test case starts it once as
//
//	argv... --root <fresh dir> --address <unix socket>
//
// in its own process group, waits for the socket, and hands the suite containerd's gRPC
// proxy client. After the case the group gets SIGTERM (SIGKILL after 10 s), and anything
// still mounted below the case's directory is unmounted. A snapshotter that died during
// the case fails it. Process output goes to <case>.log in $CONFORMANCE_LOG_DIR (else the
// case's private directory, removed afterwards).
//
// build.sh compiles this file into a test binary in GOPATH mode against Debian's Go
// source packages; integration/test_conformance.py runs it.
package conformance

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

const (
	startTimeout = 60 * time.Second
	stopTimeout  = 10 * time.Second
)

// snapshotterArgv is the command line from $CONFORMANCE_SNAPSHOTTER.
func snapshotterArgv() ([]string, error) {
	raw := os.Getenv("CONFORMANCE_SNAPSHOTTER")
	if raw == "" {
		return nil, errors.New(`CONFORMANCE_SNAPSHOTTER is not set (a JSON array, e.g. ["python3", "-m", "snapshotter", "serve"])`)
	}
	var argv []string
	if err := json.Unmarshal([]byte(raw), &argv); err != nil || len(argv) == 0 {
		return nil, fmt.Errorf("CONFORMANCE_SNAPSHOTTER: want a non-empty JSON array of strings, got %q", raw)
	}
	return argv, nil
}

// server is one snapshotter process serving one test case.
type server struct {
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	logPath string
	log     *os.File
	private string // socket (and log, unless a log dir is set); removed at the end
}

func (s *server) alive() bool {
	select {
	case <-s.exited:
		return false
	default:
		return true
	}
}

func (s *server) tail() string {
	data, err := os.ReadFile(s.logPath)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return strings.Join(lines, "\n")
}

// groupAlive reports whether any non-zombie process is left in process group pgid.
func groupAlive(pgid int) bool {
	procs, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, p := range procs {
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		// "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses
		fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+1:]))
		if len(fields) > 2 && fields[0] != "Z" && fields[2] == fmt.Sprint(pgid) {
			return true
		}
	}
	return false
}

// stop ends the process group: SIGTERM, then SIGKILL after stopTimeout.
func (s *server) stop() error {
	pgid := s.cmd.Process.Pid
	gone := func(d time.Duration) bool {
		for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
			if !s.alive() && !groupAlive(pgid) {
				return true
			}
		}
		return false
	}
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	if gone(stopTimeout) {
		return nil
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	if gone(stopTimeout) {
		return fmt.Errorf("process group %d ignored SIGTERM for %v and was killed", pgid, stopTimeout)
	}
	return fmt.Errorf("process group %d survived SIGKILL", pgid)
}

// mountPoints lists mount points strictly below dir, deepest first.
func mountPoints(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	prefix := filepath.Clean(dir) + "/"
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<24) // overlay mounts of 128 layers make long lines
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		// mountinfo escapes space, tab, newline and backslash as octal
		mp := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`).Replace(fields[4])
		if strings.HasPrefix(mp, prefix) {
			out = append(out, mp)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}

// unmountBelow detaches every mount below dir (repeating for stacked mounts).
func unmountBelow(dir string) ([]string, error) {
	var done []string
	for round := 0; round < 8; round++ {
		mps := mountPoints(dir)
		if len(mps) == 0 {
			return done, nil
		}
		for _, mp := range mps {
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				return done, fmt.Errorf("unmount %s: %w", mp, err)
			}
			done = append(done, mp)
		}
	}
	return done, fmt.Errorf("mounts left below %s", dir)
}

func startServer(argv []string, root string) (*server, string, error) {
	// a short private dir: unix socket paths are limited to 107 bytes
	private, err := os.MkdirTemp("", "conf-")
	if err != nil {
		return nil, "", err
	}
	socket := filepath.Join(private, "s.sock")
	logDir := os.Getenv("CONFORMANCE_LOG_DIR")
	if logDir == "" {
		logDir = private
	}
	s := &server{exited: make(chan struct{}), private: private,
		logPath: filepath.Join(logDir, filepath.Base(filepath.Dir(root))+".log")}
	if s.log, err = os.Create(s.logPath); err != nil {
		os.RemoveAll(private)
		return nil, "", err
	}
	args := append(append([]string{}, argv[1:]...), "--root", root, "--address", socket)
	s.cmd = exec.Command(argv[0], args...)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	// own group: SIGTERM reaches its children too; it dies with us if this binary is killed
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		s.log.Close()
		os.RemoveAll(private)
		return nil, "", err
	}
	go func() { s.waitErr = s.cmd.Wait(); close(s.exited) }()
	for end := time.Now().Add(startTimeout); ; time.Sleep(20 * time.Millisecond) {
		if !s.alive() {
			err = fmt.Errorf("snapshotter exited while starting (%v):\n%s", s.waitErr, s.tail())
		} else if c, e := net.Dial("unix", socket); e == nil {
			c.Close()
			return s, socket, nil
		} else if time.Now().After(end) {
			err = fmt.Errorf("socket not ready after %v:\n%s", startTimeout, s.tail())
		}
		if err != nil {
			s.stop()
			s.log.Close()
			os.RemoveAll(private)
			return nil, "", err
		}
	}
}

func TestContainerdSnapshotterSuite(t *testing.T) {
	argv, err := snapshotterArgv()
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() != 0 {
		t.Fatal("the suite mounts what the snapshotter returns: run as root")
	}
	newSnapshotter := func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		s, socket, err := startServer(argv, root)
		if err != nil {
			return nil, nil, err
		}
		dialCtx, cancel := context.WithTimeout(ctx, startTimeout)
		defer cancel()
		// grpc 1.33 has no unix:// resolver: pass the path through to our own dialer
		conn, err := grpc.DialContext(dialCtx, "passthrough:///"+socket, grpc.WithInsecure(), grpc.WithBlock(),
			grpc.WithContextDialer(func(ctx context.Context, path string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", path)
			}))
		if err == nil {
			sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "conformance")
			return sn, func() error { return s.finish(conn, filepath.Dir(root)) }, nil
		}
		s.finish(nil, filepath.Dir(root))
		return nil, nil, fmt.Errorf("grpc dial %s: %w", socket, err)
	}
	testsuite.SnapshotterSuite(t, "Proxy", newSnapshotter)
}

// finish closes the connection, stops the process group and unmounts leftovers below
// caseDir; it reports a snapshotter that died during the case or would not stop.
func (s *server) finish(conn *grpc.ClientConn, caseDir string) error {
	var problems []string
	if conn != nil {
		conn.Close()
	}
	if !s.alive() {
		problems = append(problems, fmt.Sprintf("snapshotter exited during the case: %v", s.waitErr))
	}
	if err := s.stop(); err != nil {
		problems = append(problems, err.Error())
	}
	s.log.Close()
	if _, err := unmountBelow(caseDir); err != nil {
		problems = append(problems, err.Error())
	}
	os.RemoveAll(s.private)
	if len(problems) > 0 {
		return fmt.Errorf("%s\nsnapshotter log (%s):\n%s", strings.Join(problems, "; "), s.logPath, s.tail())
	}
	return nil
}
