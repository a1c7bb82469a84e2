// Command ssebench measures SSE fan-out on loopback: it starts an NDJSON
// upstream, runs the sse_feed module in Caddy and a bare net/http fan-out
// baseline as separate processes, connects N subscribers to each, fires a
// burst of events and prints connect time, delivery latency, events per
// subscriber with missing and repeated ids, server CPU per delivered event
// and resident memory per idle subscriber, then the module/baseline ratios.
// It prints figures; it asserts nothing.
//
//	go run ./cmd/ssebench -n 1000 -events 100
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

type config struct {
	n          int
	events     int
	rate       float64
	proto      string
	target     string
	port       int
	caddyAdmin string
	caddyBin   string
	parallel   int
	settle     time.Duration
	timeout    time.Duration
	profile    string
}

// result holds one target's figures.
type result struct {
	name       string
	connected  int
	failed     int
	connect    time.Duration
	rssBefore  int64
	rssIdle    int64
	cpu        time.Duration
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
}

func main() {
	var cfg config
	baseline := flag.String("serve-baseline", "", "internal: serve the baseline on this address")
	upstreamURL := flag.String("upstream", "", "internal: the baseline's upstream")
	pprofAddr := flag.String("pprof", "", "internal: the baseline's pprof address")
	flag.IntVar(&cfg.n, "n", 1000, "subscribers")
	flag.IntVar(&cfg.events, "events", 100, "events in the burst")
	flag.Float64Var(&cfg.rate, "rate", 0, "events per second; 0 sends the burst back to back")
	flag.StringVar(&cfg.proto, "proto", "h1", "h1 or h2c")
	flag.StringVar(&cfg.target, "target", "both", "module, baseline or both")
	flag.IntVar(&cfg.port, "port", 9200, "module HTTP port; the baseline uses port+1, its pprof port+2")
	flag.StringVar(&cfg.caddyAdmin, "admin", "localhost:2997", "Caddy's admin address")
	flag.StringVar(&cfg.caddyBin, "caddy", "", "a Caddy binary with the module; default: build ./cmd/caddy")
	flag.IntVar(&cfg.parallel, "parallel", 100, "connections opened at a time")
	flag.DurationVar(&cfg.settle, "settle", 2*time.Second, "wait after connecting before measuring idle memory and firing")
	flag.DurationVar(&cfg.timeout, "timeout", 60*time.Second, "longest wait for the burst to be delivered")
	flag.StringVar(&cfg.profile, "profile", "", "directory for CPU (during the burst) and heap (idle) profiles of the servers")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("ssebench: ")

	if *baseline != "" {
		log.Fatal(serveBaseline(*baseline, *upstreamURL, *pprofAddr))
	}
	if _, err := ssetest.RaiseFileLimit(); err != nil {
		log.Fatal(err)
	}

	var results []result
	for _, target := range []string{"module", "baseline"} {
		if cfg.target != target && cfg.target != "both" {
			continue
		}
		r, err := run(cfg, target)
		if err != nil {
			log.Fatalf("%s: %v", target, err)
		}
		results = append(results, r)
	}
	report(cfg, results)
}

// run measures one target.
func run(cfg config, target string) (result, error) {
	r := result{name: target}
	up, err := startUpstream()
	if err != nil {
		return r, err
	}
	defer up.close()
	var srv *server
	if target == "module" {
		srv, err = startCaddy(cfg, up.url)
	} else {
		srv, err = startBaseline(cfg, up.url)
	}
	if err != nil {
		if srv != nil {
			srv.stop()
		}
		return r, err
	}
	defer srv.stop()
	pid := srv.cmd.Process.Pid

	ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout+2*time.Minute)
	defer cancel()
	d := newDialer(srv.url, cfg.proto)
	// A first subscriber starts the module's feed, so that the idle
	// memory counts subscribers only.
	warm, _, err := connect(ctx, d, 1, 1)
	if err != nil {
		return r, fmt.Errorf("first subscriber: %v", err)
	}
	if err := up.waitReader(10 * time.Second); err != nil {
		return r, err
	}
	time.Sleep(cfg.settle)
	before, err := readProc(pid)
	if err != nil {
		return r, err
	}
	r.rssBefore = before.rss
	var memBefore memStats
	if cfg.profile != "" {
		if memBefore, err = readMemStats(ctx, srv.debug); err != nil {
			log.Printf("%s: memstats: %v", target, err)
		}
	}

	start := time.Now()
	subs, failed, err := connect(ctx, d, cfg.n, cfg.parallel)
	r.connect = time.Since(start)
	r.failed = failed
	if err != nil {
		log.Printf("%s: %d of %d subscribers failed to connect; first error: %v", target, failed, cfg.n, err)
	}
	subs = slices.DeleteFunc(subs, func(s *sub) bool { return s == nil })
	r.connected = len(subs)
	defer func() {
		for _, s := range subs {
			s.conn.Close()
		}
	}()
	time.Sleep(cfg.settle)
	idle, err := readProc(pid)
	if err != nil {
		return r, err
	}
	r.rssIdle = idle.rss
	warm[0].conn.Close()
	if cfg.profile != "" {
		if mem, err := readMemStats(ctx, srv.debug); err != nil {
			log.Printf("%s: memstats: %v", target, err)
		} else {
			r.heapPerSub = float64(mem.HeapInuse-memBefore.HeapInuse) / float64(len(subs))
			r.stackPerSub = float64(mem.StackInuse-memBefore.StackInuse) / float64(len(subs))
		}
		if err := fetchProfile(ctx, srv.debug+"/pprof/heap", filepath.Join(cfg.profile, fmt.Sprintf("%s-%d-heap.pprof", target, cfg.n))); err != nil {
			log.Printf("%s: heap profile: %v", target, err)
		}
	}

	// Read every stream, fire the burst, and wait until every subscriber
	// has all events or the timeout passes.
	var profiling sync.WaitGroup
	if cfg.profile != "" {
		profiling.Go(func() {
			url := fmt.Sprintf("%s/pprof/profile?seconds=%d", srv.debug, 5)
			if err := fetchProfile(ctx, url, filepath.Join(cfg.profile, fmt.Sprintf("%s-%d-cpu.pprof", target, cfg.n))); err != nil {
				log.Printf("%s: cpu profile: %v", target, err)
			}
		})
		time.Sleep(100 * time.Millisecond)
	}
	var reading sync.WaitGroup
	for _, s := range subs {
		reading.Go(func() { s.read(cfg.events) })
	}
	cpuBefore, err := readProc(pid)
	if err != nil {
		return r, err
	}
	selfBefore, _ := readProc(os.Getpid())
	start = time.Now()
	up.fire(cfg.events, cfg.rate)
	done := make(chan struct{})
	go func() { reading.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(cfg.timeout):
		log.Printf("%s: timeout: closing streams still reading", target)
		for _, s := range subs {
			s.conn.Close()
		}
		<-done
	}
	r.burst = time.Since(start)
	after, err := readProc(pid)
	if err != nil {
		return r, err
	}
	selfAfter, _ := readProc(os.Getpid())
	r.cpu = after.cpu - cpuBefore.cpu
	r.clientCPU = selfAfter.cpu - selfBefore.cpu
	profiling.Wait()

	var latencies []int32
	for _, s := range subs {
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
	return r, nil
}

func report(cfg config, results []result) {
	mode := "burst"
	if cfg.rate > 0 {
		mode = fmt.Sprintf("%g/s", cfg.rate)
	}
	fmt.Printf("subscribers %d, events %d (%s), %s, load average before: %s\n", cfg.n, cfg.events, mode, cfg.proto, loadAverage())
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\tconnected\tconnect\tidle RSS/sub\tdelivered\tcomplete\tmissing\trepeated\tp50\tp99\tmax\tburst\tCPU\tCPU/event\tclient CPU\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%d\t%v\t%.1f KB\t%d\t%d\t%d\t%d\t%v\t%v\t%v\t%v\t%v\t%.2f µs\t%v\t\n",
			r.name, r.connected, r.connect.Round(time.Millisecond), r.rssPerSub()/1024,
			r.delivered, r.complete, r.missing+r.foreign, r.repeated,
			r.p50.Round(100*time.Microsecond), r.p99.Round(100*time.Microsecond), r.maxLatency.Round(100*time.Microsecond),
			r.burst.Round(time.Millisecond), r.cpu, r.cpuPerEvent(), r.clientCPU)
	}
	tw.Flush()
	if cfg.profile != "" {
		for _, r := range results {
			fmt.Printf("%s: per idle subscriber after a GC: heap %.1f KB, goroutine stacks %.1f KB\n", r.name, r.heapPerSub/1024, r.stackPerSub/1024)
		}
	}
	if len(results) == 2 {
		m, b := results[0], results[1]
		fmt.Printf("module/baseline: CPU per event %.2fx (goal ≤ 1.3x), RSS per idle subscriber %.2fx (goal ≤ 1.2x)\n",
			m.cpuPerEvent()/b.cpuPerEvent(), m.rssPerSub()/b.rssPerSub())
	}
}

func (r result) rssPerSub() float64 {
	if r.connected == 0 {
		return 0
	}
	return float64(r.rssIdle-r.rssBefore) / float64(r.connected)
}

// cpuPerEvent is the server's CPU per delivered event in microseconds.
func (r result) cpuPerEvent() float64 {
	if r.delivered == 0 {
		return 0
	}
	return float64(r.cpu.Microseconds()) / float64(r.delivered)
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
