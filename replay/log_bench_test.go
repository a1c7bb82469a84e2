package replay

import (
	"fmt"
	"math"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"
)

// BenchmarkAppend appends one frame to a full log, which evicts the oldest.
func BenchmarkAppend(b *testing.B) {
	l := New(Limits{Count: 1000})
	frame := []byte("id: 1\ndata: {\"id\":\"1\"}\n\n")
	ids := make([]string, 2048)
	for i := range ids {
		ids[i] = strconv.Itoa(i)
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		id := ids[i%len(ids)]
		l.Append(Frame{ID: id, Key: id, Bytes: frame})
	}
}

// BenchmarkRead reads one frame into a reused slice.
func BenchmarkRead(b *testing.B) {
	l := New(Limits{Count: 1000})
	l.Append(Frame{ID: "1", Bytes: []byte("id: 1\ndata: {}\n\n")})
	dst := make([][]byte, 0, 16)
	b.ReportAllocs()
	for b.Loop() {
		dst, _, _, _, _ = l.Read(0, dst[:0], 16, math.MaxInt)
	}
}

// BenchmarkWake appends one frame and waits until every subscriber has
// woken and read it. The cost per subscriber (ns/subscriber) stays flat
// from 10 to 10,000 subscribers.
func BenchmarkWake(b *testing.B) {
	for _, n := range []int{10, 100, 1000, 10000} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) {
			l := New(Limits{Count: 1000})
			frame := []byte("data: {}\n\n")
			var caughtUp sync.WaitGroup
			var ready sync.WaitGroup
			ready.Add(n)
			for range n {
				go func() {
					dst := make([][]byte, 0, 16)
					var cursor uint64
					var wake <-chan struct{}
					var err error
					dst, cursor, _, wake, _ = l.Read(l.Next(), dst[:0], 16, math.MaxInt)
					ready.Done()
					for {
						<-wake
						dst, cursor, _, wake, err = l.Read(cursor, dst[:0], 16, math.MaxInt)
						if err != nil {
							return
						}
						for range dst {
							caughtUp.Done()
						}
					}
				}()
			}
			ready.Wait()
			b.ReportAllocs()
			for b.Loop() {
				caughtUp.Add(n)
				l.Append(Frame{Bytes: frame})
				caughtUp.Wait()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/subscriber")
			l.Close()
		})
	}
}

// BenchmarkBurstHeap appends one poll of a million elements to a log with
// the default bounds (1000 events, 16 MiB), then the upstream shrinks back
// to small polls. It reports the heap in use before the burst, at its peak
// (the burst's frames still held by the caller, as a feed does while it
// publishes) and after the small polls, once the burst is garbage.
func BenchmarkBurstHeap(b *testing.B) {
	for _, tt := range []struct {
		name   string
		limits Limits
		after  func(*fakeClock)
	}{
		{"count bound", Limits{Count: 1000, Bytes: 16 << 20}, func(*fakeClock) {}},
		{"age bound", Limits{Count: 1_000_000, Bytes: 1 << 30, MaxAge: time.Minute},
			func(c *fakeClock) { c.advance(2 * time.Minute) }},
	} {
		b.Run(tt.name, func(b *testing.B) {
			var before, peak, after uint64
			for b.Loop() {
				before = heapInUse()
				l, clock := newClockedLog(tt.limits)
				frames := burst(1_000_000)
				l.Append(frames...)
				peak = heapInUse()
				runtime.KeepAlive(frames)
				tt.after(clock)
				for i := range 100 {
					appendNamed(l, "small-"+strconv.Itoa(i))
				}
				after = heapInUse()
				runtime.KeepAlive(l)
			}
			const mb = 1 << 20
			b.ReportMetric(float64(before)/mb, "MB-before")
			b.ReportMetric(float64(peak)/mb, "MB-peak")
			b.ReportMetric(float64(after)/mb, "MB-after")
		})
	}
}

// heapInUse collects garbage and returns the bytes of heap spans in use.
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}
