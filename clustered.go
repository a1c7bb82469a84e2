package ssefeed

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/ssefeed/caddy-ssefeed/cluster"
	"github.com/ssefeed/caddy-ssefeed/replay"
	"github.com/ssefeed/caddy-ssefeed/source"
)

// sharing is a feed's part in a cluster: the store of its shared log, and
// the mirror that fills the feed's local log from it.
type sharing struct {
	store  cluster.Store
	mirror *cluster.Mirror
	holder string
	ttl    time.Duration
}

// newSharing opens the feed's store in backend, bounded by limits. The
// feed that has it completes its mirror with the log to fill.
func newSharing(backend cluster.Backend, id string, limits replay.Limits, metrics *feedMetrics, logger *zap.Logger) *sharing {
	store := backend.Open(id, limits)
	return &sharing{
		store:  store,
		mirror: &cluster.Mirror{Store: store, Observer: metrics, Logger: logger},
		holder: backend.Holder(),
		ttl:    backend.LeaseTTL(),
	}
}

// mirrorSink is where a feed's mirror appends what the shared log has.
type mirrorSink struct{ f *feed }

// Append implements cluster.Sink. Frames in the shared log mean that the
// upstream answered the lease holder, wherever it runs: subscribers that
// wait for its first answer may start.
func (m mirrorSink) Append(frames ...replay.Frame) {
	m.f.log.Append(frames...)
	m.f.mu.Lock()
	m.f.closeAnswered()
	m.f.mu.Unlock()
}

// known has the mirror catch up with the shared log, for at most a third
// of the lease, and reports whether the local log then has id.
func (s *sharing) known(log eventLog, id string) (uint64, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), s.ttl/3)
	defer cancel()
	if s.mirror.Sync(ctx) != nil {
		return 0, false
	}
	return log.After(id)
}

// sharedState is what a lease holder stores with each append, so that the
// next holder continues where it stopped.
type sharedState struct {
	Poll     *source.PollState `json:"poll,omitempty"`
	LastID   string            `json:"last_id,omitempty"`
	LastPoll []string          `json:"last_poll,omitempty"`
}

// runShared mirrors the shared log and, while this instance holds the
// feed's lease, reads the upstream, until ctx ends. The feed is ready once
// the mirror has caught up.
func (f *feed) runShared(ctx context.Context) {
	var loops sync.WaitGroup
	loops.Go(func() { f.shared.mirror.Run(ctx) })
	loops.Go(func() {
		select {
		case <-f.shared.mirror.Ready():
			f.markReady()
		case <-ctx.Done():
		}
	})
	leader := &cluster.Leader{
		Store: f.shared.store, Holder: f.shared.holder, TTL: f.shared.ttl,
		Observer: f.metrics, Logger: f.logger,
	}
	loops.Go(func() { leader.Run(ctx, f.lead) })
	loops.Wait()
}

// lead reads the upstream for one term of the lease: it waits until the
// local log has everything appended so far, takes up the stored state, then
// runs the source with a sink that appends to the shared log.
func (f *feed) lead(ctx context.Context, m cluster.Meta) {
	if f.shared.mirror.Wait(ctx, m.Epoch, m.LastSeq) != nil {
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s := &leaseSink{f: f, ctx: ctx, cancel: cancel, epoch: m.Epoch, term: m.Term, seq: m.LastSeq}
	f.publishMu.Lock()
	f.restore(m)
	s.state = f.state(nil)
	f.publishMu.Unlock()
	f.source.Run(ctx, s)
}

// restore takes up the state stored with m. f.publishMu must be held.
func (f *feed) restore(m cluster.Meta) {
	var state sharedState
	if len(m.State) > 0 {
		if err := json.Unmarshal(m.State, &state); err != nil {
			f.logger.Warn("ignored unreadable shared state", zap.Error(err))
		}
	}
	// Generated ids are unique in the cluster: each names a sequence
	// number of the epoch that no other has.
	f.idPrefix = m.Epoch + "-"
	f.nextID = m.LastSeq
	f.lastID = state.LastID
	f.lastPoll = make(map[string]struct{}, len(state.LastPoll))
	for _, key := range state.LastPoll {
		f.lastPoll[key] = struct{}{}
	}
	if p, ok := f.source.(*source.Poll); ok {
		var ps source.PollState
		if state.Poll != nil {
			ps = *state.Poll
		}
		p.Restore(ps)
	}
}

// state returns the state to store with an append of frames: the last
// id is theirs, if any. f.publishMu must be held, and the source must be
// the caller or not running.
func (f *feed) state(frames []replay.Frame) []byte {
	// Sorted, so that an unchanged state is stored as the same bytes.
	state := sharedState{LastID: f.lastID, LastPoll: slices.Sorted(maps.Keys(f.lastPoll))}
	if len(frames) > 0 {
		state.LastID = frames[len(frames)-1].ID
	}
	if p, ok := f.source.(*source.Poll); ok {
		ps := p.State()
		state.Poll = &ps
	}
	b, _ := json.Marshal(state)
	return b
}

// leaseSink is the source's sink while this instance holds the lease: it
// appends to the shared log, fenced by the lease's term.
type leaseSink struct {
	f      *feed
	ctx    context.Context
	cancel context.CancelFunc
	epoch  string
	term   uint64
	seq    uint64 // of the last entry appended
	state  []byte // as last stored
}

// Publish implements source.Sink. It appends the frames and the state, and
// returns once the local log has them, so that the next values are deduped
// against them.
func (s *leaseSink) Publish(values []json.RawMessage) {
	s.f.publishMu.Lock()
	defer s.f.publishMu.Unlock()
	s.append(s.f.frames(values))
}

// Answered implements source.Sink. An answer that published nothing may
// still have changed the state, such as the validators of an unchanged
// document: it is stored too.
func (s *leaseSink) Answered(status int) {
	s.f.publishMu.Lock()
	s.append(nil)
	s.f.publishMu.Unlock()
	s.f.Answered(status)
}

// append appends frames, with the state as it is now unless nothing
// changed. A refused append ends the term: the next one takes up the
// state stored last and reads again what this one would have stored.
// s.f.publishMu must be held.
func (s *leaseSink) append(frames []replay.Frame) {
	f := s.f
	if s.ctx.Err() != nil {
		return
	}
	state := f.state(frames)
	if len(frames) == 0 && string(state) == string(s.state) {
		return
	}
	entries := make([]cluster.Entry, len(frames))
	for i, frame := range frames {
		entries[i] = cluster.Entry{Seq: s.seq + uint64(i) + 1, ID: frame.ID, Key: frame.Key, Bytes: frame.Bytes}
	}
	if err := f.shared.store.Append(s.ctx, s.epoch, s.term, entries, state); err != nil {
		if !errors.Is(err, cluster.ErrFenced) && !errors.Is(err, cluster.ErrEpoch) && s.ctx.Err() == nil {
			f.metrics.StoreError("append")
		}
		f.logger.Warn("stopped reading the upstream: appending to the shared log failed", zap.Error(err))
		s.cancel()
		return
	}
	s.state = state
	if len(frames) == 0 {
		return
	}
	s.seq += uint64(len(entries))
	f.published(frames)
	_ = f.shared.mirror.Wait(s.ctx, s.epoch, s.seq)
}

// LastID implements source.Sink.
func (s *leaseSink) LastID() string { return s.f.LastID() }
