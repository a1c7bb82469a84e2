package ssefeed_test

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// The process under test has its own ports, so that it never meets the
// in-process Caddy of caddytest.
const (
	stopAdmin = "localhost:2998"
	stopSite  = "http://localhost:9081"
)

// TestStopEndsStreamsAndExits runs the real binary with Caddy's default
// eternal grace period, opens a stream and runs `caddy stop`: the process
// must exit promptly, ending the stream, instead of waiting for the client.
func TestStopEndsStreamsAndExits(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the caddy binary")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "caddy-ssefeed")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/caddy").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	up := newNDJSONUpstream(t)
	config := filepath.Join(dir, "Caddyfile")
	writeFile(t, config, fmt.Sprintf(`{
	admin %s
	http_port 9081
	https_port 9444
	persist_config off
	skip_install_trust
}
%s {
	sse_feed /events {
		tail %s
		id /id
		data /body
	}
}
`, stopAdmin, stopSite, up.URL))

	caddy := startProcess(t, t.TempDir(), bin, "run", "--config", config)
	waitServing(t, stopSite+"/", caddy)

	s := ssetest.Open(t, stopSite+"/events")
	up.WaitConnected(t, 1)
	sendAndExpect(t, up, []string{"before-stop"}, s)

	// `caddy stop` returns when the process has stopped, so it runs in
	// the background while the test waits for the exit.
	startProcess(t, t.TempDir(), bin, "stop", "--address", stopAdmin)
	select {
	case <-caddy.exited:
		if caddy.err != nil {
			t.Errorf("caddy exited with %v\n%s", caddy.err, caddy.output.String())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("caddy still running 5s after stop, held by an open stream")
	}
	s.ExpectEnd(t, time.Second)
}

// process is a command running in the background.
type process struct {
	exited chan struct{} // closed when the process has exited
	err    error         // how it exited; read after exited is closed
	output bytes.Buffer  // its stdout and stderr; read after exited is closed
}

// startProcess runs bin with args, its home and XDG directories set to dir. The
// process is killed when the test ends, if it still runs.
func startProcess(t *testing.T, dir, bin string, args ...string) *process {
	t.Helper()
	p := &process{exited: make(chan struct{})}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_CONFIG_HOME="+dir, "XDG_DATA_HOME="+dir)
	cmd.Stdout, cmd.Stderr = &p.output, &p.output
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.exited
	})
	return p
}

// waitServing waits until rawURL answers, failing if the process exits or
// it takes over 10s.
func waitServing(t *testing.T, rawURL string, p *process) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(rawURL)
		if err == nil {
			resp.Body.Close()
			return
		}
		select {
		case <-p.exited:
			t.Fatalf("caddy exited before serving: %v\n%s", p.err, p.output.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not serving after 10s: %v", rawURL, err)
		}
	}
}

func writeFile(t *testing.T, name, content string) {
	t.Helper()
	if err := os.WriteFile(name, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
