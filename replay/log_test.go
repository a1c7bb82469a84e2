package replay

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// frame returns a frame with the given id, its key "k"+id and bytes of size n.
func frame(id string, n int) Frame {
	return Frame{ID: id, Key: "k" + id, Bytes: make([]byte, n)}
}

// readAll reads every frame after cursor and returns the frames' ids, which
// tests put in the bytes.
func readAll(t *testing.T, l *Log, cursor uint64) []string {
	t.Helper()
	frames, _, _, _, err := l.Read(cursor, nil, math.MaxInt, math.MaxInt)
	if err != nil {
		t.Fatalf("Read(%d): %v", cursor, err)
	}
	ids := make([]string, len(frames))
	for i, b := range frames {
		ids[i] = string(b)
	}
	return ids
}

// appendNamed appends frames whose bytes are their ids, each in its own Append.
func appendNamed(l *Log, ids ...string) {
	for _, id := range ids {
		l.Append(Frame{ID: id, Key: "k" + id, Bytes: []byte(id)})
	}
}

// fakeClock is a settable clock for the log's now field.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// newClockedLog returns a log whose clock the test moves.
func newClockedLog(limits Limits) (*Log, *fakeClock) {
	clock := &fakeClock{t: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
	l := New(limits)
	l.now = clock.now
	return l, clock
}

func TestEvictByCount(t *testing.T) {
	l := New(Limits{Count: 3})
	appendNamed(l, "a", "b", "c", "d", "e")
	if got := readAll(t, l, l.Tail(l.Next(), 10)); !slices.Equal(got, []string{"c", "d", "e"}) {
		t.Errorf("retained %v, want [c d e]", got)
	}
	if _, ok := l.After("b"); ok {
		t.Error("After(b) found an evicted frame")
	}
	if l.HasKey("kb") {
		t.Error("HasKey(kb) found an evicted frame")
	}
	if !l.HasKey("kc") {
		t.Error("HasKey(kc) lost a retained frame")
	}
}

func TestEvictByBytes(t *testing.T) {
	tests := []struct {
		name  string
		sizes []int
		want  []string
	}{
		{"under the bound", []int{3, 3, 3}, []string{"0", "1", "2"}},
		{"at the bound", []int{4, 3, 3}, []string{"0", "1", "2"}},
		{"over the bound", []int{4, 4, 4}, []string{"1", "2"}},
		{"newest alone over the bound is kept", []int{2, 2, 50}, []string{"2"}},
		{"oversized older frame goes", []int{50, 2}, []string{"1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := New(Limits{Bytes: 10})
			for i, n := range tt.sizes {
				l.Append(frame(strconv.Itoa(i), n))
			}
			var got []string
			for i := range tt.sizes {
				if _, ok := l.After(strconv.Itoa(i)); ok {
					got = append(got, strconv.Itoa(i))
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("retained %v, want %v", got, tt.want)
			}
		})
	}
}

func TestEvictByAge(t *testing.T) {
	l, clock := newClockedLog(Limits{MaxAge: time.Minute})
	appendNamed(l, "a")
	clock.advance(30 * time.Second)
	appendNamed(l, "b")
	clock.advance(31 * time.Second)
	appendNamed(l, "c") // a is now 61s old
	if got := readAll(t, l, l.Tail(l.Next(), 10)); !slices.Equal(got, []string{"b", "c"}) {
		t.Errorf("after append: retained %v, want [b c]", got)
	}

	clock.advance(40 * time.Second) // b is 71s old, c 40s
	l.Expire()
	if got := readAll(t, l, l.Tail(l.Next(), 10)); !slices.Equal(got, []string{"c"}) {
		t.Errorf("after Expire: retained %v, want [c]", got)
	}

	clock.advance(time.Hour)
	l.Expire()
	if got := readAll(t, l, l.Tail(l.Next(), 10)); !slices.Equal(got, []string{"c"}) {
		t.Errorf("the newest frame must stay for a document feed; retained %v", got)
	}
	if _, ok := l.After("c"); ok {
		t.Error("After found a frame older than MaxAge")
	}
}

func TestAfter(t *testing.T) {
	l, clock := newClockedLog(Limits{Count: 3, MaxAge: time.Minute})
	appendNamed(l, "a", "b")
	clock.advance(50 * time.Second)
	appendNamed(l, "c", "d", "e")
	clock.advance(20 * time.Second) // c, d, e are 20s old
	tests := []struct {
		id    string
		ok    bool
		after []string
	}{
		{"c", true, []string{"d", "e"}},
		{"e", true, nil},
		{"a", false, nil}, // evicted
		{"x", false, nil}, // never seen
		{"", false, nil},
	}
	for _, tt := range tests {
		cursor, ok := l.After(tt.id)
		if ok != tt.ok {
			t.Errorf("After(%q) ok = %v, want %v", tt.id, ok, tt.ok)
			continue
		}
		if ok {
			if got := readAll(t, l, cursor); !slices.Equal(got, tt.after) {
				t.Errorf("after %q read %v, want %v", tt.id, got, tt.after)
			}
		}
	}

	clock.advance(time.Minute) // all retained frames have expired
	if _, ok := l.After("e"); ok {
		t.Error("After(e) found an expired frame")
	}
}

func TestTail(t *testing.T) {
	l := New(Limits{Count: 4})
	if c := l.Tail(l.Next(), 3); c != l.Next() {
		t.Errorf("Tail(3) of an empty log = %d, want Next() = %d", c, l.Next())
	}
	appendNamed(l, "a", "b", "c", "d", "e", "f")
	tests := []struct {
		n    int
		want []string
	}{
		{0, nil},
		{1, []string{"f"}},
		{3, []string{"d", "e", "f"}},
		{4, []string{"c", "d", "e", "f"}},
		{100, []string{"c", "d", "e", "f"}},
	}
	for _, tt := range tests {
		if got := readAll(t, l, l.Tail(l.Next(), tt.n)); !slices.Equal(got, tt.want) {
			t.Errorf("Tail(%d) reads %v, want %v", tt.n, got, tt.want)
		}
	}
	// An earlier end: one frame before where e was appended.
	if got := readAll(t, l, l.Tail(l.Next()-2, 1)); !slices.Equal(got, []string{"d", "e", "f"}) {
		t.Errorf("Tail(Next-2, 1) reads %v, want [d e f]", got)
	}
	// An end before the oldest retained frame starts at the oldest.
	if got := readAll(t, l, l.Tail(1, 0)); !slices.Equal(got, []string{"c", "d", "e", "f"}) {
		t.Errorf("Tail(1, 0) reads %v, want [c d e f]", got)
	}
}

func TestRead(t *testing.T) {
	l := New(Limits{Count: 3})
	start := l.Next()
	l.Append(Frame{ID: "a", Bytes: []byte("a")}, Frame{ID: "b", Bytes: []byte("b")})

	frames, cursor, more, _, err := l.Read(start, nil, 1, math.MaxInt)
	if err != nil || !slices.Equal(toStrings(frames), []string{"a"}) || !more {
		t.Fatalf("Read max 1 = %q, more %v, %v; want [a], more", frames, more, err)
	}
	frames, cursor, more, _, err = l.Read(cursor, frames, 10, math.MaxInt)
	if err != nil || !slices.Equal(toStrings(frames), []string{"a", "b"}) || more {
		t.Fatalf("Read appending to dst = %q, more %v, %v; want [a b], no more", frames, more, err)
	}
	if cursor != l.Next() {
		t.Errorf("cursor after reading everything = %d, want Next() = %d", cursor, l.Next())
	}
	frames, after, more, _, err := l.Read(cursor, nil, 10, math.MaxInt)
	if err != nil || len(frames) != 0 || after != cursor || more {
		t.Errorf("Read at the end = %q, %d, more %v, %v; want nothing at %d", frames, after, more, err, cursor)
	}

	appendNamed(l, "c", "d") // evicts a
	if _, _, _, _, err := l.Read(start, nil, 10, math.MaxInt); !errors.Is(err, ErrEvicted) {
		t.Errorf("Read before the oldest frame: err = %v, want ErrEvicted", err)
	}
	l.Close()
	if _, _, _, _, err := l.Read(l.Tail(l.Next(), 1), nil, 10, math.MaxInt); !errors.Is(err, ErrClosed) {
		t.Errorf("Read after Close: err = %v, want ErrClosed", err)
	}
}

func TestReadBounds(t *testing.T) {
	l := New(Limits{})
	appendNamed(l, "aaa", "bbb", "ccc", "dddddddddd")
	tests := []struct {
		name                string
		skip                int // frames before the cursor
		maxFrames, maxBytes int
		want                []string
		more                bool
	}{
		{"everything", 0, 10, 100, []string{"aaa", "bbb", "ccc", "dddddddddd"}, false},
		{"frame bound", 0, 2, 100, []string{"aaa", "bbb"}, true},
		{"byte bound reached exactly", 0, 10, 6, []string{"aaa", "bbb"}, true},
		{"byte bound inside a frame", 0, 10, 8, []string{"aaa", "bbb"}, true},
		{"first frame over the byte bound", 0, 10, 1, []string{"aaa"}, true},
		{"large frame after small ones waits", 2, 10, 12, []string{"ccc"}, true},
		{"large last frame alone", 3, 10, 5, []string{"dddddddddd"}, false},
		{"nothing after the cursor", 4, 10, 5, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := l.Tail(l.Next(), 4) + uint64(tt.skip)
			frames, cursor, more, _, err := l.Read(start, nil, tt.maxFrames, tt.maxBytes)
			if err != nil {
				t.Fatal(err)
			}
			if got := toStrings(frames); !slices.Equal(got, tt.want) || more != tt.more {
				t.Errorf("Read = %q, more %v; want %q, more %v", got, more, tt.want, tt.more)
			}
			if cursor != start+uint64(len(frames)) {
				t.Errorf("cursor = %d, want %d", cursor, start+uint64(len(frames)))
			}
		})
	}
}

func toStrings(frames [][]byte) []string {
	s := make([]string, len(frames))
	for i, b := range frames {
		s[i] = string(b)
	}
	return s
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestWakeClosesAtAppendDropAndClose(t *testing.T) {
	l := New(Limits{})
	wake := l.Wake()
	_, _, _, read, _ := l.Read(l.Next(), nil, 10, math.MaxInt)
	require.Equal(t, read, wake, "Wake is not the channel Read returns at the end")
	require.False(t, isClosed(wake), "closed before anything happened")
	for _, change := range []struct {
		name string
		do   func()
	}{
		{"Append", func() { appendNamed(l, "a") }},
		{"Drop", l.Drop},
		{"Close", l.Close},
	} {
		wake := l.Wake()
		change.do()
		require.True(t, isClosed(wake), "%s did not close it", change.name)
	}
}

func TestWake(t *testing.T) {
	l := New(Limits{})
	_, cursor, _, wake, _ := l.Read(l.Next(), nil, 10, math.MaxInt)
	l.Append()
	l.Expire()
	if isClosed(wake) {
		t.Fatal("wake closed before anything was appended")
	}
	appendNamed(l, "a")
	if !isClosed(wake) {
		t.Fatal("wake not closed by Append")
	}

	_, _, _, wake, _ = l.Read(cursor, nil, 10, math.MaxInt)
	if isClosed(wake) {
		t.Fatal("a fresh wake channel is already closed")
	}
	l.Close()
	if !isClosed(wake) {
		t.Fatal("wake not closed by Close")
	}
	l.Close() // a second Close must not panic
	appendNamed(l, "b")
	if _, ok := l.After("b"); ok {
		t.Error("Append after Close added a frame")
	}
}

func TestMapsShrinkOnEviction(t *testing.T) {
	l := New(Limits{Count: 10})
	for i := range 100_000 {
		id := strconv.Itoa(i)
		l.Append(Frame{ID: id, Key: "k" + id, Bytes: []byte(id)})
	}
	l.mu.RLock()
	defer l.mu.RUnlock()
	if len(l.ids.m) != 10 || len(l.keys.m) != 10 || l.retained() != 10 {
		t.Errorf("after 100k appends: %d ids, %d keys, %d frames; want 10 each",
			len(l.ids.m), len(l.keys.m), l.retained())
	}
	if cap(l.frames) > 64 {
		t.Errorf("frame slice capacity %d: the evicted prefix is not reclaimed", cap(l.frames))
	}
}

// burst returns n frames with distinct ids and keys, as one large poll
// gives.
func burst(n int) []Frame {
	frames := make([]Frame, n)
	for i := range frames {
		id := "burst-" + strconv.Itoa(i)
		frames[i] = Frame{ID: id, Key: "k" + id, Bytes: []byte(id)}
	}
	return frames
}

// TestShrinkAfterBurst appends one burst far larger than what the log then
// retains, and checks that the frame array and the maps do not keep the
// burst's size once the upstream is small again.
func TestShrinkAfterBurst(t *testing.T) {
	const n = 50_000
	tests := []struct {
		name   string
		limits Limits
		after  func(*fakeClock) // what happens between the burst and the small polls
	}{
		{"count bound", Limits{Count: 1000}, func(*fakeClock) {}},
		{"byte bound", Limits{Bytes: 1000}, func(*fakeClock) {}},
		{"age bound", Limits{MaxAge: time.Minute}, func(c *fakeClock) { c.advance(2 * time.Minute) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, clock := newClockedLog(tt.limits)
			l.Append(burst(n)...)
			tt.after(clock)
			for i := range 3 * minShrink {
				appendNamed(l, "small-"+strconv.Itoa(i))
			}
			l.Expire()

			l.mu.RLock()
			retained, capacity := l.retained(), cap(l.frames)
			idsPeak, keysPeak := l.ids.peak, l.keys.peak
			l.mu.RUnlock()
			if retained > 3*minShrink {
				t.Fatalf("%d frames retained, want at most %d", retained, 3*minShrink)
			}
			if limit := max(4*retained, minShrink); capacity > limit || idsPeak > limit || keysPeak > limit {
				t.Errorf("%d frames retained in an array of %d, maps sized for %d ids and %d keys; want at most %d each",
					retained, capacity, idsPeak, keysPeak, limit)
			}
			newest := "small-" + strconv.Itoa(3*minShrink-1)
			if cursor, ok := l.After(newest); !ok || cursor != l.Next() || !l.HasKey("k"+newest) {
				t.Errorf("the newest frame is not found after shrinking: After = %d, %v", cursor, ok)
			}
		})
	}
}

// TestConcurrentReaders has one appender and many readers that follow
// cursors; each reader must see every frame exactly once, in order.
func TestConcurrentReaders(t *testing.T) {
	const frames, readers = 2000, 16
	l := New(Limits{Count: frames})
	start := l.Next()
	var wg sync.WaitGroup
	errs := make(chan error, readers)
	for range readers {
		wg.Go(func() {
			cursor, want := start, 0
			var buf [][]byte
			for want < frames {
				var wake <-chan struct{}
				var err error
				buf, cursor, _, wake, err = l.Read(cursor, buf[:0], 7, 20)
				if err != nil {
					errs <- err
					return
				}
				for _, b := range buf {
					if got := string(b); got != strconv.Itoa(want) {
						errs <- fmt.Errorf("read frame %q, want %d", got, want)
						return
					}
					want++
				}
				if len(buf) == 0 {
					<-wake
				}
			}
		})
	}
	for i := range frames {
		l.Append(Frame{ID: strconv.Itoa(i), Bytes: []byte(strconv.Itoa(i))})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestDropForgetsEveryRetainedID(t *testing.T) {
	log := New(Limits{})
	log.Append(Frame{ID: "a", Key: "k", Bytes: []byte("a")}, Frame{ID: "b", Bytes: []byte("b")})
	_, _, _, wake, err := log.Read(log.Next(), nil, 1, 1)
	require.NoError(t, err)
	end := log.Next()
	log.Drop()
	_, known := log.After("a")
	require.False(t, known, "an id from before the drop is known")
	require.False(t, log.HasKey("k"))
	require.True(t, isClosed(wake), "Drop did not wake the waiters")
	_, _, _, _, err = log.Read(0, nil, 1, 1)
	require.ErrorIs(t, err, ErrEvicted)
	_, _, _, _, err = log.Read(end, nil, 1, 1)
	require.ErrorIs(t, err, ErrEvicted, "a reader at the end was not told of the loss")
	log.Append(Frame{ID: "c", Bytes: []byte("c")})
	frames, _, _, _, err := log.Read(log.Tail(log.Next(), 10), nil, 10, 1<<20)
	require.NoError(t, err)
	require.Equal(t, [][]byte{[]byte("c")}, frames, "the log goes on after the drop")
}
