package rediscluster

import (
	"context"
	_ "embed"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/ssefeed/caddy-ssefeed/cluster"
	"github.com/ssefeed/caddy-ssefeed/replay"
)

// The scripts run with EVALSHA, falling back to EVAL when Redis does not
// know them (after a restart).
var (
	//go:embed acquire.lua
	acquireSource string
	//go:embed release.lua
	releaseSource string
	//go:embed append.lua
	appendSource string
	//go:embed read.lua
	readSource string

	acquireScript = redis.NewScript(acquireSource)
	releaseScript = redis.NewScript(releaseSource)
	appendScript  = redis.NewScript(appendSource)
	readScript    = redis.NewScript(readSource)
)

// store is one feed's keys in Redis, all in one hash slot:
// <prefix>:{K}:lease holds the lease holder, with the lease's expiry;
// <prefix>:{K}:meta is a hash of epoch, term, seq (the last), bytes (the
// log's total) and state; <prefix>:{K}:log is a stream with ids <seq>-0 and
// fields id, key, data and t (Redis time in ms); <prefix>:{K}:wake is the
// pub/sub channel of wake-up hints.
type store struct {
	conn   *conn
	lease  string
	meta   string
	log    string
	wake   string
	limits replay.Limits
	// release lets the connection go.
	release func()

	mu          sync.Mutex
	hints       <-chan struct{}
	unsubscribe func()
	closed      bool
}

func newStore(c *conn, base string, limits replay.Limits, release func()) *store {
	return &store{
		conn:    c,
		lease:   base + "lease",
		meta:    base + "meta",
		log:     base + "log",
		wake:    base + "wake",
		limits:  limits,
		release: release,
	}
}

// Acquire implements cluster.Store.
func (s *store) Acquire(ctx context.Context, holder string, term uint64, ttl time.Duration, newEpoch string) (cluster.Meta, bool, error) {
	reply, err := acquireScript.Run(ctx, s.conn.client(), []string{s.lease, s.meta, s.log},
		holder, term, max(ttl.Milliseconds(), 1), newEpoch).Slice()
	if err != nil {
		return cluster.Meta{}, false, err
	}
	var p parser
	m := p.meta(reply)
	if state := p.text(reply, 3); state != "" {
		m.State = []byte(state)
	}
	held := p.number(reply, 4) == 1
	return m, held, p.err
}

// Release implements cluster.Store.
func (s *store) Release(ctx context.Context, holder string, term uint64) error {
	return releaseScript.Run(ctx, s.conn.client(), []string{s.lease, s.meta}, holder, term).Err()
}

// Append implements cluster.Store.
func (s *store) Append(ctx context.Context, epoch string, term uint64, entries []cluster.Entry, state []byte) error {
	args := make([]any, 0, 7+4*len(entries))
	args = append(args, epoch, term, s.limits.Count, s.limits.Bytes, s.limits.MaxAge.Milliseconds(), s.wake, state)
	for _, e := range entries {
		args = append(args, e.Seq, e.ID, e.Key, e.Bytes)
	}
	reply, err := appendScript.Run(ctx, s.conn.client(), []string{s.meta, s.log}, args...).Slice()
	if err != nil {
		return err
	}
	var p parser
	switch code := p.number(reply, 0); {
	case p.err != nil:
		return p.err
	case code == 1:
		return cluster.ErrEpoch
	case code == 2:
		return cluster.ErrFenced
	case code == 3:
		return fmt.Errorf("append: entry %d does not follow the last entry %d", entries[0].Seq, p.number(reply, 1))
	}
	return nil
}

// Read implements cluster.Store.
func (s *store) Read(ctx context.Context, after uint64, count int) (cluster.Meta, []cluster.Entry, error) {
	reply, err := readScript.Run(ctx, s.conn.client(), []string{s.meta, s.log},
		strconv.FormatUint(after+1, 10)+"-0", count, s.limits.MaxAge.Milliseconds()).Slice()
	if err != nil {
		return cluster.Meta{}, nil, err
	}
	var p parser
	m := p.meta(reply)
	raw := p.list(reply, 3)
	entries := make([]cluster.Entry, len(raw))
	for i := range raw {
		entry := p.list(raw, i)
		id, _, _ := strings.Cut(p.text(entry, 0), "-")
		seq, err := strconv.ParseUint(id, 10, 64)
		if err != nil {
			p.fail(fmt.Errorf("entry id: %w", err))
		}
		fields := p.list(entry, 1) // id, <id>, key, <key>, data, <data>, t, <ms>
		entries[i] = cluster.Entry{
			Seq:   seq,
			ID:    p.text(fields, 1),
			Key:   p.text(fields, 3),
			Bytes: []byte(p.text(fields, 5)),
		}
	}
	if p.err != nil {
		return cluster.Meta{}, nil, p.err
	}
	return m, entries, nil
}

// Hints implements cluster.Store.
func (s *store) Hints() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hints == nil && !s.closed {
		s.hints, s.unsubscribe = s.conn.subscribe(s.wake)
	}
	return s.hints
}

// Close implements cluster.Store.
func (s *store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if s.unsubscribe != nil {
		s.unsubscribe()
	}
	s.release()
	return nil
}

// parser reads a script's reply, keeping the first error.
type parser struct {
	err error
}

func (p *parser) at(reply []any, i int) any {
	if i >= len(reply) {
		p.fail(fmt.Errorf("reply has %d values, want more than %d", len(reply), i))
		return nil
	}
	return reply[i]
}

// meta returns the epoch, term and last sequence number that a script's
// reply starts with.
func (p *parser) meta(reply []any) cluster.Meta {
	return cluster.Meta{Epoch: p.text(reply, 0), Term: p.number(reply, 1), LastSeq: p.number(reply, 2)}
}

// text returns the string at i; a nil value is "".
func (p *parser) text(reply []any, i int) string {
	switch v := p.at(reply, i).(type) {
	case nil:
		return ""
	case string:
		return v
	default:
		p.fail(fmt.Errorf("reply value %d is %T, want a string", i, v))
		return ""
	}
}

// number returns the number at i, sent as an integer or a string.
func (p *parser) number(reply []any, i int) uint64 {
	switch v := p.at(reply, i).(type) {
	case int64:
		return uint64(v)
	case string:
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			p.fail(fmt.Errorf("reply value %d: %w", i, err))
		}
		return n
	default:
		p.fail(fmt.Errorf("reply value %d is %T, want a number", i, v))
		return 0
	}
}

// list returns the array at i.
func (p *parser) list(reply []any, i int) []any {
	v := p.at(reply, i)
	list, ok := v.([]any)
	if !ok {
		p.fail(fmt.Errorf("reply value %d is %T, want an array", i, v))
	}
	return list
}

func (p *parser) fail(err error) {
	if p.err == nil {
		p.err = fmt.Errorf("unexpected script reply: %w", err)
	}
}
