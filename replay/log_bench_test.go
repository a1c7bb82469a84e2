package replay

import (
	"fmt"
	"math"
	"strconv"
	"sync"
	"testing"
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
