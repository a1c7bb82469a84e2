package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	_ "expvar" // the baseline's memstats, on its own pprof listener
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof" // the baseline's profiles, on its own pprof listener
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// upstream is the NDJSON endpoint that the servers under test read. It
// holds each reader's connection open and writes the burst's lines to it.
type upstream struct {
	url  string
	srv  *http.Server
	mu   sync.Mutex
	outs []chan []byte
	conn chan struct{} // receives when a reader connects
}

func startUpstream() (*upstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	u := &upstream{url: "http://" + ln.Addr().String() + "/feed.ndjson", conn: make(chan struct{}, 16)}
	u.srv = &http.Server{Handler: http.HandlerFunc(u.serve)}
	go u.srv.Serve(ln)
	return u, nil
}

func (u *upstream) serve(w http.ResponseWriter, r *http.Request) {
	out := make(chan []byte, 1024)
	u.mu.Lock()
	u.outs = append(u.outs, out)
	u.mu.Unlock()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	u.conn <- struct{}{}
	for {
		select {
		case line := <-out:
			if _, err := w.Write(line); err != nil {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
		case <-r.Context().Done():
			return
		}
	}
}

// waitReader waits until a server under test has connected.
func (u *upstream) waitReader(timeout time.Duration) error {
	select {
	case <-u.conn:
		return nil
	case <-time.After(timeout):
		return errors.New("the server under test did not connect to the upstream")
	}
}

// fire sends events 1..n, each line carrying its send time in nanoseconds,
// back to back or at rate events per second.
func (u *upstream) fire(n int, rate float64) {
	u.mu.Lock()
	outs := u.outs
	u.mu.Unlock()
	var interval time.Duration
	if rate > 0 {
		interval = time.Duration(float64(time.Second) / rate)
	}
	start := time.Now()
	for i := 1; i <= n; i++ {
		if interval > 0 {
			time.Sleep(time.Until(start.Add(time.Duration(i-1) * interval)))
		}
		line := fmt.Appendf(nil, "{\"id\":\"%d\",\"t\":%d}\n", i, time.Now().UnixNano())
		for _, out := range outs {
			out <- line
		}
	}
}

func (u *upstream) close() { u.srv.Close() }

// server is a server under test running as a child process.
type server struct {
	name  string
	cmd   *exec.Cmd
	url   string // the event stream
	debug string // base URL of /debug
	dir   string
}

func (s *server) stop() {
	if s.cmd.Process != nil {
		_ = s.cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = s.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = s.cmd.Process.Kill()
			<-done
		}
	}
	if s.dir != "" {
		os.RemoveAll(s.dir)
	}
}

// caddyBinary builds ./cmd/caddy of the module into dir.
func caddyBinary(dir string) (string, error) {
	bin := filepath.Join(dir, "caddy")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/caddy")
	cmd.Dir = moduleRoot()
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	return bin, cmd.Run()
}

// moduleRoot finds the repository root from the working directory.
func moduleRoot() string {
	dir, _ := os.Getwd()
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			return dir
		}
	}
}

// startCaddy runs Caddy with the module, tailing the upstream.
func startCaddy(cfg config, upstreamURL string) (*server, error) {
	dir, err := os.MkdirTemp("", "ssebench-caddy")
	if err != nil {
		return nil, err
	}
	s := &server{name: "module", dir: dir}
	bin := cfg.caddyBin
	if bin == "" {
		if bin, err = caddyBinary(dir); err != nil {
			s.stop()
			return nil, fmt.Errorf("building caddy: %v", err)
		}
	}
	protocols := "h1"
	if cfg.proto == "h2c" {
		protocols = "h1 h2c"
	}
	caddyfile := fmt.Sprintf(`{
	admin %s
	http_port %d
	auto_https off
	persist_config off
	log {
		level ERROR
	}
	servers {
		protocols %s
	}
}

:%d {
	sse_feed /events {
		tail %s
		id /id
		heartbeat off
		replay %d
	}
}
`, cfg.caddyAdmin, cfg.port, protocols, cfg.port, upstreamURL, max(1000, 2*cfg.events))
	file := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(file, []byte(caddyfile), 0o600); err != nil {
		s.stop()
		return nil, err
	}
	s.cmd = exec.Command(bin, "run", "--config", file, "--adapter", "caddyfile")
	s.cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	s.cmd.Stderr = os.Stderr
	if err := s.cmd.Start(); err != nil {
		s.stop()
		return nil, err
	}
	s.url = fmt.Sprintf("127.0.0.1:%d/events", cfg.port)
	s.debug = "http://" + cfg.caddyAdmin + "/debug"
	return s, waitListening(fmt.Sprintf("127.0.0.1:%d", cfg.port), s.cmd)
}

// startBaseline re-executes this program as the bare net/http fan-out
// server.
func startBaseline(cfg config, upstreamURL string) (*server, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", cfg.port+1)
	pprofAddr := fmt.Sprintf("127.0.0.1:%d", cfg.port+2)
	s := &server{name: "baseline", url: addr + "/events", debug: "http://" + pprofAddr + "/debug"}
	s.cmd = exec.Command(exe, "-serve-baseline", addr, "-upstream", upstreamURL, "-pprof", pprofAddr)
	s.cmd.Stderr = os.Stderr
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	return s, waitListening(addr, s.cmd)
}

func waitListening(addr string, cmd *exec.Cmd) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s did not listen on %s", cmd.Path, addr)
}

// serveBaseline is the bare fan-out server: it reads the upstream's NDJSON,
// encodes each line once as a frame and hands it to every subscriber's
// goroutine, which writes and flushes it.
func serveBaseline(addr, upstreamURL, pprofAddr string) error {
	h := &hub{subs: make(map[*subscriber]struct{})}
	go h.read(upstreamURL)
	if pprofAddr != "" {
		go http.ListenAndServe(pprofAddr, nil) // net/http/pprof's handlers
	}
	mux := http.NewServeMux()
	mux.Handle("/events", h)
	srv := &http.Server{Addr: addr, Handler: mux, Protocols: new(http.Protocols)}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	return srv.ListenAndServe()
}

type hub struct {
	mu   sync.Mutex
	subs map[*subscriber]struct{}
}

type subscriber struct {
	frames chan []byte
	done   chan struct{}
}

// read reads the upstream and broadcasts each line as a frame.
func (h *hub) read(upstreamURL string) {
	for {
		resp, err := http.Get(upstreamURL)
		if err != nil {
			time.Sleep(time.Second)
			continue
		}
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 8<<20)
		for sc.Scan() {
			var elem struct {
				ID string `json:"id"`
			}
			if json.Unmarshal(sc.Bytes(), &elem) != nil {
				continue
			}
			frame := make([]byte, 0, len(elem.ID)+len(sc.Bytes())+12)
			frame = append(frame, "id: "...)
			frame = append(frame, elem.ID...)
			frame = append(frame, "\ndata: "...)
			frame = append(frame, sc.Bytes()...)
			frame = append(frame, "\n\n"...)
			h.broadcast(frame)
		}
		resp.Body.Close()
	}
}

func (h *hub) broadcast(frame []byte) {
	h.mu.Lock()
	subs := make([]*subscriber, 0, len(h.subs))
	for s := range h.subs {
		subs = append(subs, s)
	}
	h.mu.Unlock()
	for _, s := range subs {
		select {
		case s.frames <- frame:
		case <-s.done:
		}
	}
}

func (h *hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s := &subscriber{frames: make(chan []byte, 64), done: make(chan struct{})}
	h.mu.Lock()
	h.subs[s] = struct{}{}
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(h.subs, s)
		h.mu.Unlock()
		close(s.done)
	}()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	flusher := w.(http.Flusher)
	flusher.Flush()
	for {
		select {
		case frame := <-s.frames:
			if _, err := w.Write(frame); err != nil {
				return
			}
			flusher.Flush()
		case <-r.Context().Done():
			return
		}
	}
}

// procStats reads a process's CPU time and resident memory from /proc.
type procStats struct {
	cpu time.Duration
	rss int64 // bytes
}

func readProc(pid int) (procStats, error) {
	var st procStats
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return st, err
	}
	// Fields after the parenthesised command name; utime and stime are
	// the 14th and 15th fields, in clock ticks of 10ms.
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	st.cpu = time.Duration(utime+stime) * 10 * time.Millisecond
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return st, err
	}
	for line := range strings.Lines(string(status)) {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			st.rss = kb << 10
		}
	}
	return st, nil
}

// memStats is the part of a server's runtime.MemStats that tells where
// the memory of idle subscribers goes.
type memStats struct {
	HeapInuse  int64
	StackInuse int64
}

// readMemStats reads a server's memstats from its /debug/vars after a
// garbage collection, which fetching the heap profile with gc=1 forces.
func readMemStats(ctx context.Context, debugURL string) (memStats, error) {
	var vars struct{ Memstats memStats }
	if err := fetchProfile(ctx, debugURL+"/pprof/heap?gc=1", os.DevNull); err != nil {
		return vars.Memstats, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, debugURL+"/vars", nil)
	if err != nil {
		return vars.Memstats, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return vars.Memstats, err
	}
	defer resp.Body.Close()
	err = json.NewDecoder(resp.Body).Decode(&vars)
	return vars.Memstats, err
}

// fetchProfile saves a pprof profile of a server into dir.
func fetchProfile(ctx context.Context, url, file string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.ReadFrom(resp.Body)
	return err
}
