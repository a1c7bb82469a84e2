// Package clustertest starts real Redis servers for the cluster's tests and
// checks that tests leave no goroutine behind.
package clustertest

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Redis is a redis-server listening on a unix socket only, without
// persistence: stopping it loses its data.
type Redis struct {
	t      testing.TB
	dir    string
	cmd    *exec.Cmd
	output bytes.Buffer
}

// StartRedis starts a redis-server for t and stops it when t ends. Without
// redis-server in PATH, it skips t, or fails it if SSEFEED_REQUIRE_REDIS is
// 1.
func StartRedis(t testing.TB) *Redis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		const msg = "redis-server not found in PATH; install it (Debian: apt-get install redis-server) to run the cluster tests"
		if os.Getenv("SSEFEED_REQUIRE_REDIS") == "1" {
			t.Fatal(msg + " (SSEFEED_REQUIRE_REDIS=1)")
		}
		t.Skip(msg)
	}
	r := &Redis{t: t, dir: t.TempDir()}
	r.Start()
	t.Cleanup(r.Stop)
	return r
}

// Socket returns the path of the server's unix socket.
func (r *Redis) Socket() string { return filepath.Join(r.dir, "redis.sock") }

// URL returns the server's address for go-redis.
func (r *Redis) URL() string { return "unix://" + r.Socket() }

// Start starts the server on its socket, empty, and waits until it accepts
// connections.
func (r *Redis) Start() {
	r.t.Helper()
	if r.cmd != nil {
		r.t.Fatal("redis-server is running already")
	}
	r.output.Reset()
	cmd := exec.Command("redis-server",
		"--port", "0",
		"--unixsocket", r.Socket(),
		"--unixsocketperm", "700",
		"--save", "",
		"--appendonly", "no",
		"--dir", r.dir,
	)
	cmd.Stdout = &r.output
	cmd.Stderr = &r.output
	if err := cmd.Start(); err != nil {
		r.t.Fatalf("start redis-server: %v", err)
	}
	r.cmd = cmd
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", r.Socket())
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			r.Stop()
			r.t.Fatalf("redis-server did not listen within 10s: %v\n%s", err, r.output.String())
		}
		// A child process, not a goroutine: synctest cannot wait for it.
		time.Sleep(5 * time.Millisecond)
	}
}

// Stop stops the server, losing its data. Stopping a stopped server does
// nothing.
func (r *Redis) Stop() {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	_ = r.cmd.Process.Signal(syscall.SIGCONT) // in case it is paused
	_ = r.cmd.Wait()
	r.cmd = nil
	_ = os.Remove(r.Socket())
}

// Restart stops the server and starts it again on the same socket, empty,
// as Redis comes back after a crash without persistence.
func (r *Redis) Restart() {
	r.t.Helper()
	r.Stop()
	r.Start()
}

// Pause stops the server's process without ending it, as a network
// partition or a stalled host would: connections stay open, commands wait.
func (r *Redis) Pause() {
	r.t.Helper()
	if err := r.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		r.t.Fatalf("pause redis-server: %v", err)
	}
}

// Resume lets a paused server run again, with its data.
func (r *Redis) Resume() {
	r.t.Helper()
	if err := r.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		r.t.Fatalf("resume redis-server: %v", err)
	}
}
