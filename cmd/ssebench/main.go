// Command ssebench measures SSE fan-out on loopback: it starts an NDJSON
// upstream, runs the sse_feed module in Caddy and a bare net/http fan-out
// baseline as separate processes, connects N subscribers to each, fires a
// burst of events and prints connect time, delivery latency, events per
// subscriber with missing and repeated ids, server CPU per delivered event
// and resident memory per idle subscriber, then the ratios between targets.
// With -cluster N it compares one Caddy with N Caddy instances sharing a
// redis-server, and counts Redis commands per event; with -per-request N it
// serves N per-request feeds of one subscriber each and measures CPU per
// upstream request and memory per feed. It prints figures; it asserts
// nothing.
//
//	go run ./cmd/ssebench -n 1000 -events 100
//	go run ./cmd/ssebench -n 1000 -cluster 3
//	go run ./cmd/ssebench -per-request 10000
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

type config struct {
	n             int
	events        int
	rate          float64
	proto         string
	targets       []string
	port          int
	caddyAdmin    string
	caddyBin      string
	parallel      int
	settle        time.Duration
	timeout       time.Duration
	profile       string
	cluster       int
	flushInterval time.Duration
	perRequest    int
	pollInterval  time.Duration
	window        time.Duration
}

// subscribers is how many subscribers a target with this many server
// processes gets.
func (cfg config) subscribers(instances int) int {
	if cfg.perRequest > 0 {
		return cfg.perRequest
	}
	return cfg.n * instances
}

// path is the stream a subscriber opens; user names its per-request feed.
func (cfg config) path(user string) string {
	if cfg.perRequest > 0 {
		return "/user?u=" + user
	}
	return "/events"
}

// result holds one target's figures.
type result struct {
	name       string
	load       string // load average before the run
	instances  []instance
	connected  int
	failed     int
	connect    time.Duration
	delivered  int
	complete   int // subscribers that got every event
	missing    int
	repeated   int
	foreign    int
	p50, p99   time.Duration
	maxLatency time.Duration
	burst      time.Duration // from the first event sent to the last subscriber done
	clientCPU  time.Duration

	heapPerSub, stackPerSub float64 // with -profile: Go heap and stack in use per idle subscriber

	redisCommands map[string]int64 // in a cluster: Redis commands over the burst, by name
	redisCPU      time.Duration    // in a cluster: the Redis server's CPU over the burst

	requests int64         // with -per-request: upstream requests in the window
	window   time.Duration // with -per-request: how long CPU and requests were counted
}

// instance holds the figures of one server process of a target.
type instance struct {
	pid       int
	connected int
	rssBefore int64
	rssIdle   int64
	files     int           // open files grown while the subscribers connected
	cpu       time.Duration // over the burst, or the window with -per-request
	writes    int64         // write calls over the burst
	delivered int
}

func main() {
	var cfg config
	baseline := flag.String("serve-baseline", "", "internal: serve the baseline on this address")
	upstreamURL := flag.String("upstream", "", "internal: the baseline's upstream")
	pprofAddr := flag.String("pprof", "", "internal: the baseline's pprof address")
	targets := flag.String("target", "", "comma-separated: module, baseline, cluster; default module,baseline, or module,cluster with -cluster")
	flag.IntVar(&cfg.n, "n", 1000, "subscribers (per instance with -cluster)")
	flag.IntVar(&cfg.events, "events", 100, "events in the burst")
	flag.Float64Var(&cfg.rate, "rate", 0, "events per second; 0 sends the burst back to back")
	flag.StringVar(&cfg.proto, "proto", "h1", "h1 or h2c")
	flag.IntVar(&cfg.port, "port", 9200, "module HTTP port; the baseline uses port+1, its pprof port+2")
	flag.StringVar(&cfg.caddyAdmin, "admin", "localhost:2997", "Caddy's admin address")
	flag.StringVar(&cfg.caddyBin, "caddy", "", "a Caddy binary with the module; default: build ./cmd/caddy")
	flag.IntVar(&cfg.parallel, "parallel", 100, "connections opened at a time")
	flag.DurationVar(&cfg.settle, "settle", 2*time.Second, "wait after connecting before measuring idle memory and firing")
	flag.DurationVar(&cfg.timeout, "timeout", 60*time.Second, "longest wait for the burst to be delivered")
	flag.StringVar(&cfg.profile, "profile", "", "directory for CPU (during the burst) and heap (idle) profiles of the servers")
	flag.IntVar(&cfg.cluster, "cluster", 0, "Caddy instances of the cluster target, sharing one redis-server; subscribers are spread over them")
	flag.DurationVar(&cfg.flushInterval, "flush-interval", 0, "the module's flush_interval; 0 leaves it unset")
	flag.IntVar(&cfg.perRequest, "per-request", 0, "per-request feeds of one subscriber each, instead of the burst: measure CPU per upstream request and memory per feed")
	flag.DurationVar(&cfg.pollInterval, "poll", 5*time.Second, "with -per-request: the feeds' poll interval")
	flag.DurationVar(&cfg.window, "window", 30*time.Second, "with -per-request: how long CPU and upstream requests are counted")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("ssebench: ")

	if *baseline != "" {
		log.Fatal(serveBaseline(*baseline, *upstreamURL, *pprofAddr))
	}
	switch {
	case *targets != "":
		cfg.targets = strings.Split(*targets, ",")
	case cfg.cluster > 0:
		cfg.targets = []string{"module", "cluster"}
	case cfg.perRequest > 0:
		cfg.targets = []string{"module"}
	default:
		cfg.targets = []string{"module", "baseline"}
	}
	for _, target := range cfg.targets {
		switch {
		case target == "cluster" && cfg.cluster < 1:
			log.Fatal("the cluster target needs -cluster N")
		case target == "baseline" && cfg.perRequest > 0:
			log.Fatal("the baseline has no per-request feeds")
		case target != "module" && target != "baseline" && target != "cluster":
			log.Fatalf("unknown target %q", target)
		}
	}
	if _, err := ssetest.RaiseFileLimit(); err != nil {
		log.Fatal(err)
	}
	if cfg.caddyBin == "" {
		dir, err := os.MkdirTemp("", "ssebench-build")
		if err != nil {
			log.Fatal(err)
		}
		defer os.RemoveAll(dir)
		if cfg.caddyBin, err = buildCaddy(dir); err != nil {
			log.Fatalf("building caddy: %v", err)
		}
	}

	var results []result
	for _, target := range cfg.targets {
		r, err := run(cfg, target)
		if err != nil {
			log.Fatalf("%s: %v", target, err)
		}
		results = append(results, r)
	}
	if cfg.perRequest > 0 {
		reportPerRequest(cfg, results)
	} else {
		report(cfg, results)
	}
}

// deployment is the server processes of one target and the Redis they
// share, if any.
type deployment struct {
	servers []*server
	redis   *server
}

// deploy starts target's servers, reading up.
func deploy(cfg config, target string, up *upstream) (*deployment, error) {
	d := &deployment{}
	switch target {
	case "baseline":
		srv, err := startBaseline(cfg, up)
		d.servers = append(d.servers, srv)
		return d, err
	case "module":
		srv, err := startCaddy(cfg, 0, feedBlock(cfg, up, ""))
		d.servers = append(d.servers, srv)
		return d, err
	}
	var err error
	if d.redis, err = startRedis(); err != nil {
		return d, fmt.Errorf("redis-server: %v", err)
	}
	for i := range cfg.cluster {
		srv, err := startCaddy(cfg, i, feedBlock(cfg, up, d.redis.addr))
		d.servers = append(d.servers, srv)
		if err != nil {
			return d, err
		}
	}
	return d, nil
}

func (d *deployment) stop() {
	for _, srv := range d.servers {
		if srv != nil {
			srv.stop()
		}
	}
	if d.redis != nil {
		d.redis.stop()
	}
}

// readProcs reads every server's CPU time and memory.
func (d *deployment) readProcs() ([]procStats, error) {
	stats := make([]procStats, len(d.servers))
	for i, srv := range d.servers {
		var err error
		if stats[i], err = readProc(srv.cmd.Process.Pid); err != nil {
			return nil, err
		}
	}
	return stats, nil
}

// memStats reads the Go memory of every server, summed.
func (d *deployment) memStats(ctx context.Context) (memStats, error) {
	var sum memStats
	for _, srv := range d.servers {
		mem, err := readMemStats(ctx, srv.debug)
		if err != nil {
			return sum, err
		}
		sum.HeapInuse += mem.HeapInuse
		sum.StackInuse += mem.StackInuse
	}
	return sum, nil
}

// profileName names the profile file of a target's server i.
func (d *deployment) profileName(cfg config, target string, i int, kind string) string {
	name := fmt.Sprintf("%s-%d", target, cfg.n)
	if cfg.perRequest > 0 {
		name = fmt.Sprintf("%s-per-request-%d", target, cfg.perRequest)
	}
	if len(d.servers) > 1 {
		name += fmt.Sprintf("-%d", i)
	}
	return filepath.Join(cfg.profile, name+"-"+kind+".pprof")
}

// run measures one target.
func run(cfg config, target string) (result, error) {
	r := result{name: target, load: loadAverage()}
	up, err := startUpstream()
	if err != nil {
		return r, err
	}
	defer up.close()
	d, err := deploy(cfg, target, up)
	defer d.stop()
	if err != nil {
		return r, err
	}
	r.instances = make([]instance, len(d.servers))
	dialers := make([]*dialer, len(d.servers))
	for i, srv := range d.servers {
		r.instances[i].pid = srv.cmd.Process.Pid
		dialers[i] = newDialer(srv.addr, cfg.proto)
	}
	// open opens subscriber i on server i mod the servers, with the user
	// that name gives it.
	open := func(name func(i int) string) func(context.Context, int) (*sub, error) {
		return func(ctx context.Context, i int) (*sub, error) {
			instance := i % len(dialers)
			s, err := dialers[instance].open(ctx, cfg.path(name(i)))
			if err == nil {
				s.instance = instance
			}
			return s, err
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout+2*time.Minute)
	defer cancel()
	// A first subscriber on each server starts the module's feed, so that
	// the idle memory counts subscribers only.
	warm, _, err := connect(ctx, len(dialers), len(dialers), open(func(i int) string { return fmt.Sprintf("warm%d", i) }))
	if err != nil {
		return r, fmt.Errorf("first subscriber: %v", err)
	}
	if err := up.waitReader(10 * time.Second); err != nil {
		return r, err
	}
	time.Sleep(cfg.settle)
	before, err := d.readProcs()
	if err != nil {
		return r, err
	}
	var memBefore memStats
	if cfg.profile != "" {
		if memBefore, err = d.memStats(ctx); err != nil {
			log.Printf("%s: memstats: %v", target, err)
		}
	}

	start := time.Now()
	n := cfg.subscribers(len(d.servers))
	subs, failed, err := connect(ctx, n, cfg.parallel, open(strconv.Itoa))
	r.connect = time.Since(start)
	r.failed = failed
	if err != nil {
		log.Printf("%s: %d of %d subscribers failed to connect; first error: %v", target, failed, n, err)
	}
	subs = slices.DeleteFunc(subs, func(s *sub) bool { return s == nil })
	r.connected = len(subs)
	defer func() {
		for _, s := range subs {
			s.conn.Close()
		}
	}()
	for _, s := range subs {
		r.instances[s.instance].connected++
	}
	time.Sleep(cfg.settle)
	idle, err := d.readProcs()
	if err != nil {
		return r, err
	}
	for i := range r.instances {
		r.instances[i].rssBefore, r.instances[i].rssIdle = before[i].rss, idle[i].rss
		r.instances[i].files = idle[i].files - before[i].files
	}
	for _, s := range warm {
		s.conn.Close()
	}
	if cfg.profile != "" {
		if mem, err := d.memStats(ctx); err != nil {
			log.Printf("%s: memstats: %v", target, err)
		} else {
			r.heapPerSub = float64(mem.HeapInuse-memBefore.HeapInuse) / float64(len(subs))
			r.stackPerSub = float64(mem.StackInuse-memBefore.StackInuse) / float64(len(subs))
		}
		for i, srv := range d.servers {
			if err := fetchProfile(ctx, srv.debug+"/pprof/heap", d.profileName(cfg, target, i, "heap")); err != nil {
				log.Printf("%s: heap profile: %v", target, err)
			}
		}
	}
	if cfg.perRequest > 0 {
		return r, measureWindow(ctx, cfg, &r, d, up)
	}
	return r, measureBurst(ctx, cfg, &r, d, up, subs)
}

// profileCPU profiles the servers' CPU for the next d seconds, when
// cfg.profile asks for it, and returns what to wait for the files.
func (d *deployment) profileCPU(ctx context.Context, cfg config, target string, duration time.Duration) *sync.WaitGroup {
	var profiling sync.WaitGroup
	if cfg.profile == "" {
		return &profiling
	}
	for i, srv := range d.servers {
		profiling.Go(func() {
			url := fmt.Sprintf("%s/pprof/profile?seconds=%d", srv.debug, int(duration.Seconds()))
			if err := fetchProfile(ctx, url, d.profileName(cfg, target, i, "cpu")); err != nil {
				log.Printf("%s: cpu profile: %v", target, err)
			}
		})
	}
	time.Sleep(100 * time.Millisecond)
	return &profiling
}

// measureWindow counts the servers' CPU and the upstream requests over
// cfg.window, while the per-request feeds poll.
func measureWindow(ctx context.Context, cfg config, r *result, d *deployment, up *upstream) error {
	profiling := d.profileCPU(ctx, cfg, r.name, cfg.window)
	defer profiling.Wait()
	before, err := d.readProcs()
	if err != nil {
		return err
	}
	requests := up.requests.Load()
	start := time.Now()
	time.Sleep(cfg.window)
	after, err := d.readProcs()
	if err != nil {
		return err
	}
	r.requests = up.requests.Load() - requests
	r.window = time.Since(start)
	for i := range r.instances {
		r.instances[i].cpu = after[i].cpu - before[i].cpu
	}
	return nil
}

// measureBurst reads every stream, fires the burst, and waits until every
// subscriber has all events or the timeout passes.
func measureBurst(ctx context.Context, cfg config, r *result, d *deployment, up *upstream, subs []*sub) error {
	profiling := d.profileCPU(ctx, cfg, r.name, 5*time.Second)
	var reading sync.WaitGroup
	for _, s := range subs {
		reading.Go(func() { s.read(cfg.events) })
	}
	cpuBefore, err := d.readProcs()
	if err != nil {
		return err
	}
	var commandsBefore map[string]int64
	var redisBefore procStats
	if d.redis != nil {
		if commandsBefore, err = redisCommands(d.redis.addr); err != nil {
			return fmt.Errorf("redis commands: %v", err)
		}
		redisBefore, _ = readProc(d.redis.cmd.Process.Pid)
	}
	selfBefore, _ := readProc(os.Getpid())
	start := time.Now()
	up.fire(cfg.events, cfg.rate)
	done := make(chan struct{})
	go func() { reading.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(cfg.timeout):
		log.Printf("%s: timeout: closing streams still reading", r.name)
		for _, s := range subs {
			s.conn.Close()
		}
		<-done
	}
	r.burst = time.Since(start)
	after, err := d.readProcs()
	if err != nil {
		return err
	}
	selfAfter, _ := readProc(os.Getpid())
	if d.redis != nil {
		redisAfter, _ := readProc(d.redis.cmd.Process.Pid)
		r.redisCPU = redisAfter.cpu - redisBefore.cpu
		commands, err := redisCommands(d.redis.addr)
		if err != nil {
			return fmt.Errorf("redis commands: %v", err)
		}
		r.redisCommands = make(map[string]int64)
		for name, calls := range commands {
			if delta := calls - commandsBefore[name]; delta > 0 && name != "info" {
				r.redisCommands[name] = delta
			}
		}
	}
	for i := range r.instances {
		r.instances[i].cpu = after[i].cpu - cpuBefore[i].cpu
		r.instances[i].writes = after[i].writes - cpuBefore[i].writes
	}
	r.clientCPU = selfAfter.cpu - selfBefore.cpu
	profiling.Wait()

	var latencies []int32
	for _, s := range subs {
		r.instances[s.instance].delivered += s.events
		r.delivered += s.events
		r.repeated += s.repeated
		r.foreign += s.foreign
		r.missing += cfg.events - s.distinct
		if s.distinct == cfg.events {
			r.complete++
		}
		latencies = append(latencies, s.latency...)
	}
	slices.Sort(latencies)
	if len(latencies) > 0 {
		at := func(q float64) time.Duration {
			return time.Duration(latencies[int(q*float64(len(latencies)-1))]) * time.Microsecond
		}
		r.p50, r.p99, r.maxLatency = at(0.5), at(0.99), at(1)
	}
	return nil
}

func report(cfg config, results []result) {
	mode := "burst"
	if cfg.rate > 0 {
		mode = fmt.Sprintf("%g/s", cfg.rate)
	}
	options := ""
	if cfg.flushInterval > 0 {
		options = fmt.Sprintf(", flush_interval %v", cfg.flushInterval)
	}
	perInstance := ""
	if cfg.cluster > 0 {
		perInstance = fmt.Sprintf(" per instance (cluster of %d)", cfg.cluster)
	}
	fmt.Printf("subscribers %d%s, events %d (%s), %s%s\n", cfg.n, perInstance, cfg.events, mode, cfg.proto, options)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\tload before\tconnected\tconnect\tidle RSS/sub\tdelivered\tcomplete\tmissing\trepeated\tp50\tp99\tmax\tburst\twrites/sub/s\tCPU\tCPU/write\tCPU/event\tclient CPU\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%v\t%.1f KB\t%d\t%d\t%d\t%d\t%v\t%v\t%v\t%v\t%.1f\t%v\t%.1f µs\t%.2f µs\t%v\t\n",
			r.name, r.load, r.connected, r.connect.Round(time.Millisecond), r.rssPerSub()/1024,
			r.delivered, r.complete, r.missing+r.foreign, r.repeated,
			r.p50.Round(100*time.Microsecond), r.p99.Round(100*time.Microsecond), r.maxLatency.Round(100*time.Microsecond),
			r.burst.Round(time.Millisecond), r.writeRate(), r.cpu(), perEvent(r.cpu(), int(r.writes())), r.cpuPerEvent(), r.clientCPU)
		if len(r.instances) > 1 {
			for i, in := range r.instances {
				fmt.Fprintf(tw, "%s #%d\t\t%d\t\t%.1f KB\t%d\t\t\t\t\t\t\t\t\t%v\t%.1f µs\t%.2f µs\t\t\n",
					r.name, i, in.connected, in.rssPerSub()/1024, in.delivered, in.cpu, perEvent(in.cpu, int(in.writes)), perEvent(in.cpu, in.delivered))
			}
		}
	}
	tw.Flush()
	for _, r := range results {
		if r.redisCommands == nil {
			continue
		}
		var total int64
		var names []string
		for name, calls := range r.redisCommands {
			total += calls
			names = append(names, name)
		}
		slices.SortFunc(names, func(a, b string) int { return int(r.redisCommands[b] - r.redisCommands[a]) })
		var parts []string
		for _, name := range names {
			parts = append(parts, fmt.Sprintf("%s %.2f", name, float64(r.redisCommands[name])/float64(cfg.events)))
		}
		fmt.Printf("%s: Redis over the burst: %d commands, %.2f per event (%s; commands that scripts call included), Redis CPU %v (%.1f µs per event)\n",
			r.name, total, float64(total)/float64(cfg.events), strings.Join(parts, ", "), r.redisCPU, float64(r.redisCPU.Microseconds())/float64(cfg.events))
	}
	if cfg.profile != "" {
		for _, r := range results {
			fmt.Printf("%s: per idle subscriber after a GC: heap %.1f KB, goroutine stacks %.1f KB\n", r.name, r.heapPerSub/1024, r.stackPerSub/1024)
		}
	}
	for _, r := range results[1:] {
		a, b := r, results[0]
		if r.name == "baseline" {
			a, b = b, a
		}
		fmt.Printf("%s/%s: CPU per event %.2fx, RSS per idle subscriber %.2fx, p99 latency %v vs %v\n",
			a.name, b.name, a.cpuPerEvent()/b.cpuPerEvent(), a.rssPerSub()/b.rssPerSub(),
			a.p99.Round(100*time.Microsecond), b.p99.Round(100*time.Microsecond))
	}
}

func reportPerRequest(cfg config, results []result) {
	fmt.Printf("per-request feeds %d, one subscriber each, polled every %v, %s\n", cfg.perRequest, cfg.pollInterval, cfg.proto)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\tload before\tconnected\tconnect\tRSS/feed\tfiles/feed\twindow\tupstream requests\trequests/s\tCPU\tCPU/request\t")
	for _, r := range results {
		files := 0
		for _, in := range r.instances {
			files += in.files
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%v\t%.1f KB\t%.2f\t%v\t%d\t%.0f\t%v\t%.1f µs\t\n",
			r.name, r.load, r.connected, r.connect.Round(time.Millisecond), r.rssPerSub()/1024,
			float64(files)/float64(max(r.connected, 1)), r.window.Round(time.Millisecond), r.requests, float64(r.requests)/r.window.Seconds(),
			r.cpu(), perEvent(r.cpu(), int(r.requests)))
	}
	tw.Flush()
	if cfg.profile != "" {
		for _, r := range results {
			fmt.Printf("%s: per feed after a GC: heap %.1f KB, goroutine stacks %.1f KB\n", r.name, r.heapPerSub/1024, r.stackPerSub/1024)
		}
	}
}

// rssPerSub is the growth of resident memory per subscriber, over all the
// target's servers.
func (r result) rssPerSub() float64 {
	var grown int64
	for _, in := range r.instances {
		grown += in.rssIdle - in.rssBefore
	}
	if r.connected == 0 {
		return 0
	}
	return float64(grown) / float64(r.connected)
}

func (in instance) rssPerSub() float64 {
	if in.connected == 0 {
		return 0
	}
	return float64(in.rssIdle-in.rssBefore) / float64(in.connected)
}

// writes is the servers' write calls over the burst.
func (r result) writes() int64 {
	var sum int64
	for _, in := range r.instances {
		sum += in.writes
	}
	return sum
}

// writeRate is the servers' write calls per subscriber per second of the
// burst: with events spaced, how often each subscriber is written to.
func (r result) writeRate() float64 {
	if r.connected == 0 || r.burst == 0 {
		return 0
	}
	return float64(r.writes()) / float64(r.connected) / r.burst.Seconds()
}

// cpu is the CPU time of all the target's servers.
func (r result) cpu() time.Duration {
	var sum time.Duration
	for _, in := range r.instances {
		sum += in.cpu
	}
	return sum
}

// cpuPerEvent is the servers' CPU per delivered event in microseconds.
func (r result) cpuPerEvent() float64 { return perEvent(r.cpu(), r.delivered) }

// perEvent is cpu per event, or per any other count, in microseconds.
func perEvent(cpu time.Duration, events int) float64 {
	if events == 0 {
		return 0
	}
	return float64(cpu.Microseconds()) / float64(events)
}

func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	var one, five, fifteen string
	fmt.Sscan(string(b), &one, &five, &fifteen)
	return one + " " + five + " " + fifteen
}
