// Package cluster lets several instances serve one feed from a shared log:
// one instance at a time holds the feed's lease and appends what it reads
// upstream, and every instance mirrors the shared log into its local
// replay.Log. The storage is a Store, provided by a Backend such as the redis
// guest module; Leader and Mirror are the loops that run over it.
package cluster

import (
	"context"
	"time"

	"github.com/ssefeed/caddy-ssefeed/replay"
)

// Entry is one event as the shared log stores it.
type Entry struct {
	// Seq is the entry's position in its epoch's log: 1 for the first entry,
	// then one more for each entry, without gaps.
	Seq uint64
	// ID is the event id written in the frame.
	ID string
	// Key identifies the upstream element the event came from. It may be
	// empty.
	Key string
	// Bytes is the event's wire form.
	Bytes []byte
}

// Meta is a feed's shared state.
type Meta struct {
	// Epoch names the life of the shared log. A new epoch starts when the
	// store has no state for the feed: on first use, or after the store lost
	// its data. Sequence numbers of different epochs are unrelated.
	Epoch string
	// Term is the lease's fencing token: it grows by one each time an
	// instance takes the lease.
	Term uint64
	// LastSeq is the Seq of the last entry appended in the epoch, or 0.
	LastSeq uint64
	// State is the upstream reader's opaque state, stored with the last
	// append so that the next holder continues where the last one stopped.
	// Only Acquire returns it.
	State []byte
}

// Store is one feed's shared log, lease and wake-up hints.
type Store interface {
	// Acquire takes the lease for holder for ttl. With term 0, it takes the
	// lease if it is free and keeps it if holder holds it already; taking
	// it increments the term. With another term, it only renews a lease
	// that holder holds with that term. It reports the meta and whether
	// holder holds the lease. If the store has no meta for the feed, it
	// starts the epoch newEpoch first, discarding whatever else it kept.
	Acquire(ctx context.Context, holder string, term uint64, ttl time.Duration, newEpoch string) (Meta, bool, error)
	// Release gives up the lease if holder holds it with term.
	Release(ctx context.Context, holder string, term uint64) error
	// Append stores the entries, numbered from the meta's LastSeq+1, and
	// the upstream state, which replaces the stored one, in one step; it
	// trims the log to its limits and, if it stored entries, wakes the
	// feed's mirrors. It returns ErrEpoch unless epoch is the
	// current one and ErrFenced unless term is the lease's current term.
	// Entries already stored are skipped, so that a retry is harmless.
	Append(ctx context.Context, epoch string, term uint64, entries []Entry, state []byte) error
	// Read returns the meta, without State, and up to count entries with a
	// Seq after after, oldest first, in one consistent snapshot. Entries
	// older than the log's age limit are left out, except the newest.
	Read(ctx context.Context, after uint64, count int) (Meta, []Entry, error)
	// Hints returns a channel that receives a value, without blocking the
	// sender, when the log may have grown. The first call starts listening.
	// A hint may be lost: readers must also read now and then.
	Hints() <-chan struct{}
	// Close stops the hints and lets the store's connection go.
	Close() error
}

// Backend opens the stores of a cluster. The redis guest module is one.
type Backend interface {
	// Open returns the store of the feed identified by feed, which must be
	// the same on every instance for the same feed. Limits bound its log.
	// Opening connects to nothing; the store connects on first use.
	Open(feed string, limits replay.Limits) Store
	// Holder returns an id of this instance for the lease.
	Holder() string
	// LeaseTTL returns how long a lease lasts unless renewed.
	LeaseTTL() time.Duration
}

// Observer is told what the loops do, for metrics.
type Observer interface {
	// StoreError records one failed store operation: "acquire", "renew",
	// "release", "append" or "read".
	StoreError(op string)
	// LeaseChange records that this instance took (true) or lost (false)
	// the lease.
	LeaseChange(held bool)
}

// Sink receives mirrored frames. *replay.Log is one.
type Sink interface {
	Append(frames ...replay.Frame)
}

type clusterError string

func (e clusterError) Error() string { return string(e) }

const (
	// ErrFenced is returned by Append for a term that is no longer the
	// lease's: another instance took the lease since.
	ErrFenced = clusterError("cluster: lease taken over; append refused")
	// ErrEpoch is returned by Append for an epoch that is no longer the
	// feed's: the store lost its data since.
	ErrEpoch = clusterError("cluster: log epoch changed; append refused")
)
