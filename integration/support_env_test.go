// Package integration holds every test that runs Caddy, in this process
// through caddytest, as the real binary, or behind a real browser, and the
// goldens of the Caddyfile adapter. The tests use only what a user has:
// Caddyfiles, HTTP, and the module's exported names. The unit tests stay
// next to the code they test.
package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// TestMain runs the tests, removes the binary they built, and says in one
// line each which tests were skipped for want of a program.
func TestMain(m *testing.M) {
	code := m.Run()
	removeBuilds()
	for _, skip := range skipped.list() {
		announce(code, "integration: "+skip)
	}
	os.Exit(code)
}

// requirement is an outside program that some tests need.
type requirement struct {
	tests string // the tests that need it, for the skip message
	env   string // the variable that, set to 1, makes its absence a failure
}

// requirements are the programs requireProgram knows.
var requirements = map[string]requirement{
	"chromium":     {tests: "browser tests", env: "SSEFEED_REQUIRE_BROWSER"},
	"redis-server": {tests: "Redis tests", env: "SSEFEED_REQUIRE_REDIS"},
}

// requireProgram returns the path of program, one of requirements. Without
// it the test is skipped and TestMain says so in one line at the end, even
// without -v; with the requirement's variable set to 1, as in CI, the test
// fails instead.
func requireProgram(t *testing.T, program string) string {
	t.Helper()
	r, known := requirements[program]
	if !known {
		t.Fatalf("%s is not among the requirements", program)
	}
	path, err := exec.LookPath(program)
	if err == nil {
		return path
	}
	msg := fmt.Sprintf("%s skipped: %s not found (set %s=1 to fail instead)", r.tests, program, r.env)
	if os.Getenv(r.env) == "1" {
		t.Fatalf("%s not found and %s=1", program, r.env)
	}
	skipped.add(msg)
	t.Skip(msg)
	return ""
}

// skipped records the skips that TestMain reports, each once.
var skipped skipList

type skipList struct {
	mu   sync.Mutex
	msgs []string
}

func (s *skipList) add(msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !slices.Contains(s.msgs, msg) {
		s.msgs = append(s.msgs, msg)
	}
}

func (s *skipList) list() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.msgs)
}

// announce prints line on the test's output. When the go command keeps that
// output to itself, as `go test ./...` does for a package that passed
// without -v, it also writes line to the go command's standard error, so
// that the line is seen without -v: when that is a terminal or a pipe, not
// a file, whose offset the go command keeps to itself.
func announce(code int, line string) {
	fmt.Println(line)
	if code != 0 || testing.Verbose() {
		return // the go command shows the output
	}
	parent := "/proc/" + strconv.Itoa(os.Getppid())
	if exe, err := os.Readlink(parent + "/exe"); err != nil || filepath.Base(exe) != "go" {
		return // not run by the go command
	}
	ours, err := os.Stdout.Stat()
	if err != nil {
		return
	}
	if theirs, err := os.Stat(parent + "/fd/1"); err == nil && os.SameFile(ours, theirs) {
		return // the go command streams the output
	}
	if info, err := os.Stat(parent + "/fd/2"); err != nil || info.Mode().IsRegular() {
		return
	}
	stderr, err := os.OpenFile(parent+"/fd/2", os.O_WRONLY, 0)
	if err != nil {
		return
	}
	defer stderr.Close()
	_, _ = fmt.Fprintln(stderr, line)
}

// raiseFileLimit lifts the limit on open files for the load tests, which
// hold thousands of sockets, both ends in this process, and skips the test
// when the limit stays under need.
func raiseFileLimit(t *testing.T, need uint64) {
	t.Helper()
	limit, err := ssetest.RaiseFileLimit()
	if err != nil || limit < need {
		t.Skipf("cannot open %d files (limit %d): %v", need, limit, err)
	}
}

// heapInuse returns the heap in use after a garbage collection.
func heapInuse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// liveHeap returns the bytes of live heap objects that the last garbage
// collection found: cheap enough to sample often, since it forces no
// collection.
func liveHeap() uint64 {
	sample := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(sample)
	return sample[0].Value.Uint64()
}

// vmRSS returns the resident memory of this process, from /proc.
func vmRSS(t require.TestingT) uint64 {
	status, err := os.ReadFile("/proc/self/status")
	require.NoError(t, err)
	for line := range strings.Lines(string(status)) {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kib, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			require.NoError(t, err, "VmRSS %q", rest)
			return kib << 10
		}
	}
	require.Fail(t, "no VmRSS in /proc/self/status")
	return 0
}
