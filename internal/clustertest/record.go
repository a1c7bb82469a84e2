package clustertest

import (
	"slices"
	"sync"

	"github.com/ssefeed/caddy-ssefeed/replay"
)

// Recorder is a mirror's sink that records the ids of the frames appended
// and the resets, in order.
type Recorder struct {
	mu     sync.Mutex
	events []string
}

// Append records the frames' ids.
func (r *Recorder) Append(frames ...replay.Frame) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, f := range frames {
		r.events = append(r.events, f.ID)
	}
}

// Reset records a reset to epoch, as "reset <epoch>".
func (r *Recorder) Reset(epoch string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, "reset "+epoch)
}

// Got returns what was recorded.
func (r *Recorder) Got() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

// Observer counts the store errors and records the lease changes it is
// told of.
type Observer struct {
	mu     sync.Mutex
	errors map[string]int
	leases []bool
}

// StoreError counts an error of op.
func (o *Observer) StoreError(op string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.errors == nil {
		o.errors = make(map[string]int)
	}
	o.errors[op]++
}

// LeaseChange records a lease taken (true) or lost.
func (o *Observer) LeaseChange(held bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.leases = append(o.leases, held)
}

// Errors returns how many errors of op were counted.
func (o *Observer) Errors(op string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.errors[op]
}

// Leases returns the lease changes, in order.
func (o *Observer) Leases() []bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.leases)
}
