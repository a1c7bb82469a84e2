package cluster

import (
	"context"
	"slices"
	"sync"
	"time"
)

// memStore is a Store in memory, with the Redis store's semantics, for
// tests that need a fake clock. Fail and stall inject faults.
type memStore struct {
	mu      sync.Mutex
	epoch   string
	term    uint64
	holder  string
	expires time.Time
	entries []Entry
	state   []byte
	hints   chan struct{}
	// fail, if not nil, is returned by every call.
	fail error
	// stall, if not nil, blocks every call until it is closed or the
	// call's context ends.
	stall chan struct{}
	// muted drops hints.
	muted bool
	calls map[string]int
}

func newMemStore() *memStore {
	return &memStore{hints: make(chan struct{}, 1), calls: make(map[string]int)}
}

// enter counts a call of op and applies the faults. It returns with s.mu
// held unless it returns an error.
func (s *memStore) enter(ctx context.Context, op string) error {
	s.mu.Lock()
	s.calls[op]++
	stall := s.stall
	s.mu.Unlock()
	if stall != nil {
		select {
		case <-stall:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	s.mu.Lock()
	if s.fail != nil {
		defer s.mu.Unlock()
		return s.fail
	}
	return nil
}

func (s *memStore) count(op string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[op]
}

func (s *memStore) set(f func(s *memStore)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(s)
}

func (s *memStore) meta() Meta {
	m := Meta{Epoch: s.epoch, Term: s.term, State: s.state}
	if len(s.entries) > 0 {
		m.LastSeq = s.entries[len(s.entries)-1].Seq
	}
	return m
}

func (s *memStore) Acquire(ctx context.Context, holder string, term uint64, ttl time.Duration, newEpoch string) (Meta, bool, error) {
	if err := s.enter(ctx, "acquire"); err != nil {
		return Meta{}, false, err
	}
	defer s.mu.Unlock()
	if s.epoch == "" {
		if term != 0 {
			return Meta{}, false, nil
		}
		s.epoch, s.term, s.holder, s.entries, s.state = newEpoch, 0, "", nil, nil
	}
	now := time.Now()
	free := s.holder == "" || !now.Before(s.expires)
	switch {
	case !free && s.holder == holder && (term == 0 || term == s.term):
	case free && term == 0:
		s.term++
		s.holder = holder
	default:
		return s.meta(), false, nil
	}
	s.expires = now.Add(ttl)
	return s.meta(), true, nil
}

func (s *memStore) Release(ctx context.Context, holder string, term uint64) error {
	if err := s.enter(ctx, "release"); err != nil {
		return err
	}
	defer s.mu.Unlock()
	if s.holder == holder && s.term == term {
		s.holder = ""
	}
	return nil
}

func (s *memStore) Append(ctx context.Context, epoch string, term uint64, entries []Entry, state []byte) error {
	if err := s.enter(ctx, "append"); err != nil {
		return err
	}
	defer s.mu.Unlock()
	switch {
	case epoch != s.epoch:
		return ErrEpoch
	case term != s.term:
		return ErrFenced
	}
	added := false
	for _, e := range entries {
		if e.Seq > s.meta().LastSeq {
			s.entries = append(s.entries, e)
			added = true
		}
	}
	s.state = state
	if added && !s.muted {
		select {
		case s.hints <- struct{}{}:
		default:
		}
	}
	return nil
}

func (s *memStore) Read(ctx context.Context, after uint64, count int) (Meta, []Entry, error) {
	if err := s.enter(ctx, "read"); err != nil {
		return Meta{}, nil, err
	}
	defer s.mu.Unlock()
	i, _ := slices.BinarySearchFunc(s.entries, after+1, func(e Entry, seq uint64) int {
		return int(e.Seq) - int(seq)
	})
	m := s.meta()
	m.State = nil
	return m, slices.Clone(s.entries[i:min(i+count, len(s.entries))]), nil
}

func (s *memStore) Hints() <-chan struct{} { return s.hints }

func (s *memStore) Close() error { return nil }
