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
	"sync/atomic"
	"time"
)

// upstream is what the servers under test read: an NDJSON stream at
// /feed.ndjson, held open while the burst's lines are written to it, and a
// small JSON document per user at /user/<u> for per-request feeds, whose
// requests it counts.
type upstream struct {
	base     string // http://host:port
	srv      *http.Server
	mu       sync.Mutex
	outs     []chan []byte
	conn     chan struct{} // receives when a reader connects
	requests atomic.Int64  // to /user/
}

func startUpstream() (*upstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	u := &upstream{base: "http://" + ln.Addr().String(), conn: make(chan struct{}, 1)}
	mux := http.NewServeMux()
	mux.HandleFunc("/feed.ndjson", u.serveTail)
	mux.HandleFunc("/user/{u}", u.serveUser)
	u.srv = &http.Server{Handler: mux}
	go u.srv.Serve(ln)
	return u, nil
}

// connected tells waitReader that a reader came.
func (u *upstream) connected() {
	select {
	case u.conn <- struct{}{}:
	default:
	}
}

func (u *upstream) serveTail(w http.ResponseWriter, r *http.Request) {
	out := make(chan []byte, 1024)
	u.mu.Lock()
	u.outs = append(u.outs, out)
	u.mu.Unlock()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	u.connected()
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

// serveUser answers the same small document for a user every time, with
// no validator.
func (u *upstream) serveUser(w http.ResponseWriter, r *http.Request) {
	u.requests.Add(1)
	u.connected()
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, "{\"user\":%q,\"status\":\"active\",\"unread\":3}\n", r.PathValue("u"))
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

// server is a server under test, or the Redis they share, running as a
// child process.
type server struct {
	name   string
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has exited
	addr   string        // where it listens: host:port, or a unix socket's path
	debug  string        // base URL of /debug
	dir    string
}

func (s *server) stop() {
	if s.exited != nil {
		_ = s.cmd.Process.Signal(os.Interrupt)
		select {
		case <-s.exited:
		case <-time.After(5 * time.Second):
			_ = s.cmd.Process.Kill()
			<-s.exited
		}
	}
	if s.dir != "" {
		os.RemoveAll(s.dir)
	}
}

// start starts the server's command and waits until it listens on addr.
func (s *server) start(network string) error {
	s.cmd.Stderr = os.Stderr
	if err := s.cmd.Start(); err != nil {
		return err
	}
	s.exited = make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(s.exited) }()
	deadline := time.After(30 * time.Second)
	for {
		if c, err := net.Dial(network, s.addr); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-s.exited:
			return fmt.Errorf("%s exited before listening on %s", s.name, s.addr)
		case <-deadline:
			return fmt.Errorf("%s did not listen on %s", s.name, s.addr)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// buildCaddy builds ./cmd/caddy of the module into dir.
func buildCaddy(dir string) (string, error) {
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

// feedBlock is the sse_feed directive that Caddy serves: a tail of the
// upstream's NDJSON at /events, or with -per-request a poll of the
// requesting user's document at /user; in a cluster when redisSocket is
// set.
func feedBlock(cfg config, up *upstream, redisSocket string) string {
	var b strings.Builder
	if cfg.perRequest > 0 {
		fmt.Fprintf(&b, "\tsse_feed /user {\n\t\tpoll %s/user/{query.u} %v\n\t\tmax_feeds %d\n", up.base, cfg.pollInterval, cfg.perRequest+1)
	} else {
		fmt.Fprintf(&b, "\tsse_feed /events {\n\t\ttail %s/feed.ndjson\n\t\tid /id\n\t\treplay %d\n", up.base, max(1000, 2*cfg.events))
	}
	b.WriteString("\t\theartbeat off\n")
	if cfg.flushInterval > 0 {
		fmt.Fprintf(&b, "\t\tflush_interval %v\n", cfg.flushInterval)
	}
	if redisSocket != "" {
		fmt.Fprintf(&b, "\t\tcluster redis {\n\t\t\taddress unix://%s\n\t\t\tlease 2s\n\t\t}\n", redisSocket)
	}
	b.WriteString("\t}\n")
	return b.String()
}

// startCaddy runs Caddy with the module serving feed. The first instance
// listens on cfg.port with its admin API at cfg.caddyAdmin; other
// instances of a cluster on free ports.
func startCaddy(cfg config, instance int, feed string) (*server, error) {
	dir, err := os.MkdirTemp("", "ssebench-caddy")
	if err != nil {
		return nil, err
	}
	s := &server{name: "caddy", dir: dir}
	port, admin := cfg.port, cfg.caddyAdmin
	if instance > 0 {
		if port, err = freePort(); err != nil {
			return s, err
		}
		adminPort, err := freePort()
		if err != nil {
			return s, err
		}
		admin = fmt.Sprintf("localhost:%d", adminPort)
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
%s}
`, admin, port, protocols, port, feed)
	file := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(file, []byte(caddyfile), 0o600); err != nil {
		return s, err
	}
	s.cmd = exec.Command(cfg.caddyBin, "run", "--config", file, "--adapter", "caddyfile")
	s.cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	s.addr = fmt.Sprintf("127.0.0.1:%d", port)
	s.debug = "http://" + admin + "/debug"
	return s, s.start("tcp")
}

// freePort returns a loopback port that nothing listened on a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// startRedis runs a redis-server without persistence on a unix socket.
func startRedis() (*server, error) {
	dir, err := os.MkdirTemp("", "ssebench-redis")
	if err != nil {
		return nil, err
	}
	s := &server{name: "redis-server", dir: dir, addr: filepath.Join(dir, "redis.sock")}
	s.cmd = exec.Command("redis-server", "--port", "0", "--unixsocket", s.addr, "--unixsocketperm", "700",
		"--save", "", "--appendonly", "no", "--dir", dir, "--logfile", filepath.Join(dir, "redis.log"))
	return s, s.start("unix")
}

// startBaseline re-executes this program as the bare net/http fan-out
// server.
func startBaseline(cfg config, up *upstream) (*server, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", cfg.port+1)
	pprofAddr := fmt.Sprintf("127.0.0.1:%d", cfg.port+2)
	s := &server{name: "baseline", addr: addr, debug: "http://" + pprofAddr + "/debug"}
	s.cmd = exec.Command(exe, "-serve-baseline", addr, "-upstream", up.base+"/feed.ndjson", "-pprof", pprofAddr)
	return s, s.start("tcp")
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

// procStats reads a process's CPU time, resident memory and write calls
// from /proc.
type procStats struct {
	cpu    time.Duration
	rss    int64 // bytes
	writes int64 // write(2) and writev(2) calls
	files  int   // open file descriptors
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
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return st, err
	}
	st.files = len(fds)
	io, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return st, err
	}
	for line := range strings.Lines(string(io)) {
		if rest, ok := strings.CutPrefix(line, "syscw:"); ok {
			st.writes, _ = strconv.ParseInt(strings.TrimSpace(rest), 10, 64)
		}
	}
	return st, nil
}

// redisCommands reads, from the Redis on socket, how many times each
// command was called, the commands that its Lua scripts call included.
func redisCommands(socket string) (map[string]int64, error) {
	out, err := exec.Command("redis-cli", "-s", socket, "INFO", "commandstats").Output()
	if err != nil {
		return nil, err
	}
	calls := make(map[string]int64)
	for line := range strings.Lines(string(out)) {
		// cmdstat_evalsha:calls=12,usec=...
		name, rest, ok := strings.Cut(strings.TrimPrefix(line, "cmdstat_"), ":calls=")
		if !ok {
			continue
		}
		n, _, _ := strings.Cut(rest, ",")
		calls[name], _ = strconv.ParseInt(n, 10, 64)
	}
	return calls, nil
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
