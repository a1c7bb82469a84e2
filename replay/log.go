// Package replay holds the bounded log of encoded events that a feed keeps
// for resumption. The log is also the broadcast medium: every subscriber holds
// a cursor into it and waits for frames after its cursor, so publishing costs
// the same however many subscribers there are, and a slow subscriber only
// falls behind its own cursor.
package replay

import (
	"maps"
	"sync"
	"time"
)

// Frame is one encoded event in the log.
type Frame struct {
	// Seq is the frame's position in the log; it grows by one per frame.
	Seq uint64
	// ID is the event id written in the frame.
	ID string
	// Key identifies the upstream element the frame came from, for
	// recognising elements seen before. It may be empty.
	Key string
	// Bytes is the frame's wire form. It is never modified once appended.
	Bytes []byte
	// Time is when the frame was appended.
	Time time.Time
}

// Limits bound what a log retains. A zero field means no bound of that kind.
type Limits struct {
	// Count is the most frames retained.
	Count int
	// Bytes is the most frame bytes retained.
	Bytes int
	// MaxAge is the longest a frame is retained.
	MaxAge time.Duration
}

// Log is a bounded, append-only sequence of frames with O(1) lookup by id
// and by key. It is safe for concurrent use.
type Log struct {
	limits Limits
	now    func() time.Time

	mu     sync.RWMutex
	frames []Frame // frames[head:] are retained, in Seq order
	head   int
	next   uint64 // Seq of the next frame appended
	bytes  int
	ids    index
	keys   index
	wake   chan struct{}
	closed bool
}

// New returns an empty log bounded by limits.
func New(limits Limits) *Log {
	return &Log{
		limits: limits,
		now:    time.Now,
		ids:    newIndex(),
		keys:   newIndex(),
		wake:   make(chan struct{}),
	}
}

// Append adds frames to the log in order, assigning their Seq and Time,
// evicts what the limits no longer allow, and wakes every waiter once.
func (l *Log) Append(frames ...Frame) {
	if len(frames) == 0 {
		return
	}
	now := l.now()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	// Frames that the count bound would evict at once are never stored, so
	// a burst far over the bound costs no memory beyond it.
	if c := l.limits.Count; c > 0 && len(frames) > c {
		l.next += uint64(len(frames) - c)
		frames = frames[len(frames)-c:]
	}
	for _, f := range frames {
		f.Seq = l.next
		f.Time = now
		l.next++
		l.frames = append(l.frames, f)
		l.bytes += len(f.Bytes)
		l.ids.set(f.ID, f.Seq)
		l.keys.set(f.Key, f.Seq)
	}
	l.evict(now)
	close(l.wake)
	l.wake = make(chan struct{})
	l.mu.Unlock()
}

// evict drops the oldest frames beyond the limits. It keeps at least the
// newest frame regardless of the byte bound, so that a document feed always
// has its latest document. l.mu must be held for writing.
func (l *Log) evict(now time.Time) {
	evicted := false
	for l.retained() > 0 {
		oldest := &l.frames[l.head]
		over := l.limits.Count > 0 && l.retained() > l.limits.Count ||
			l.limits.Bytes > 0 && l.bytes > l.limits.Bytes && l.retained() > 1 ||
			l.limits.MaxAge > 0 && now.Sub(oldest.Time) > l.limits.MaxAge && l.retained() > 1
		if !over {
			break
		}
		l.bytes -= len(oldest.Bytes)
		l.ids.delete(oldest.ID, oldest.Seq)
		l.keys.delete(oldest.Key, oldest.Seq)
		*oldest = Frame{}
		l.head++
		evicted = true
	}
	if !evicted {
		return
	}
	// Reclaim the dead prefix once it is at least half the slice, into a
	// smaller array when a burst left one far larger than what is retained.
	if l.head >= len(l.frames)/2 {
		n := l.retained()
		if c := cap(l.frames); c > minShrink && n < c/4 {
			l.frames = append(make([]Frame, 0, max(2*n, minShrink)), l.frames[l.head:]...)
		} else {
			copy(l.frames, l.frames[l.head:])
			clear(l.frames[n:])
			l.frames = l.frames[:n]
		}
		l.head = 0
	}
	l.ids.shrink()
	l.keys.shrink()
}

func (l *Log) retained() int { return len(l.frames) - l.head }

// first returns the Seq of the oldest retained frame. l.mu must be held.
func (l *Log) first() uint64 { return l.next - uint64(l.retained()) }

// Expire evicts frames older than the age limit. Appending does this too;
// Expire lets a quiet feed age out its frames.
func (l *Log) Expire() {
	l.mu.Lock()
	l.evict(l.now())
	l.mu.Unlock()
}

// Next returns the Seq that the next appended frame will get: a cursor
// positioned at Next reads only frames appended from now on.
func (l *Log) Next() uint64 {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.next
}

// Tail returns a cursor n frames before end, a cursor such as Next once
// returned, but not before the oldest retained frame.
func (l *Log) Tail(end uint64, n int) uint64 {
	l.mu.RLock()
	defer l.mu.RUnlock()
	first := l.first()
	if end < first+uint64(n) {
		return first
	}
	return end - uint64(n)
}

// After returns a cursor just after the frame with the given id, and whether
// that frame is retained and younger than the age limit.
func (l *Log) After(id string) (cursor uint64, ok bool) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	seq, ok := l.ids.m[id]
	if !ok {
		return 0, false
	}
	f := &l.frames[l.head+int(seq-l.first())]
	if l.limits.MaxAge > 0 && l.now().Sub(f.Time) > l.limits.MaxAge {
		return 0, false
	}
	return seq + 1, true
}

// HasKey reports whether a frame with the given key is retained.
func (l *Log) HasKey(key string) bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	_, ok := l.keys.m[key]
	return ok
}

// Read appends to dst the bytes of the frames from cursor on, at most
// maxFrames frames and maxBytes bytes, though always the first frame
// however large. It returns them with the cursor after the last one,
// whether more frames are ready after that cursor, and a channel that is
// closed when a frame is appended after them or the log is closed. If
// frames before the log's oldest retained one were requested, Read returns
// ErrEvicted: the reader fell too far behind.
func (l *Log) Read(cursor uint64, dst [][]byte, maxFrames, maxBytes int) (frames [][]byte, next uint64, more bool, wake <-chan struct{}, err error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return dst, cursor, false, nil, ErrClosed
	}
	if cursor < l.first() {
		return dst, cursor, false, nil, ErrEvicted
	}
	i := l.head + int(cursor-l.first())
	for n, size := 0, 0; i < len(l.frames) && n < maxFrames; i, n = i+1, n+1 {
		b := l.frames[i].Bytes
		if size += len(b); n > 0 && size > maxBytes {
			break
		}
		dst = append(dst, b)
		cursor++
	}
	return dst, cursor, i < len(l.frames), l.wake, nil
}

// Wake returns a channel that is closed when a frame is appended, the log
// is dropped or closed: the one Read returns with the log's end.
func (l *Log) Wake() <-chan struct{} {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.wake
}

// Drop forgets the log's history, as when the shared log it mirrors lost
// data: every retained frame is evicted, its id and key unknown, and every
// cursor, even one at the end, gets ErrEvicted, so that each reader is told
// of the loss (with the reset event) instead of going on across a gap.
func (l *Log) Drop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.frames, l.head, l.bytes = nil, 0, 0
	l.ids, l.keys = newIndex(), newIndex()
	l.next++ // a cursor at the old end is now before the oldest frame
	if !l.closed {
		close(l.wake)
		l.wake = make(chan struct{})
	}
}

// Close ends the log: waiters wake and reads return ErrClosed.
func (l *Log) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.closed = true
		close(l.wake)
	}
}

// minShrink is the smallest frame array or index that is shrunk: below it,
// the memory is not worth the copying.
const minShrink = 1024

// index maps frame ids or keys to their Seq. A Go map keeps its memory when
// entries are deleted, so the index builds a new map when it holds far fewer
// entries than it once did; each entry then costs O(1) amortised.
type index struct {
	m    map[string]uint64
	peak int // the most entries m held
}

func newIndex() index { return index{m: make(map[string]uint64)} }

// set maps name to seq; an empty name is not indexed.
func (x *index) set(name string, seq uint64) {
	if name != "" {
		x.m[name] = seq
		x.peak = max(x.peak, len(x.m))
	}
}

// delete removes name if it still maps to seq, which a newer frame with the
// same name has not taken over.
func (x *index) delete(name string, seq uint64) {
	if s, ok := x.m[name]; ok && s == seq {
		delete(x.m, name)
	}
}

// shrink rebuilds the map when it holds under a quarter of its peak.
func (x *index) shrink() {
	if x.peak > minShrink && len(x.m) < x.peak/4 {
		m := make(map[string]uint64, len(x.m))
		maps.Copy(m, x.m)
		x.m, x.peak = m, len(m)
	}
}

type logError string

func (e logError) Error() string { return string(e) }

const (
	// ErrEvicted is returned by Read for a cursor whose frames were evicted.
	ErrEvicted = logError("replay: frames after the cursor were evicted")
	// ErrClosed is returned by Read once the log is closed.
	ErrClosed = logError("replay: log closed")
)
