package rediscluster

import (
	"context"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// hub carries the wake-up hints of every feed of one client over a single
// subscription, and fans each out to the feed's listeners without
// blocking. A hint that finds a listener's buffer full is dropped: the
// listener has one pending already.
type hub struct {
	pubsub *redis.PubSub
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	listeners map[string]map[chan struct{}]struct{} // by channel
	changed   chan struct{}                         // the channels to subscribe changed
}

func newHub(rdb *redis.Client) *hub {
	ctx, cancel := context.WithCancel(context.Background())
	h := &hub{
		pubsub:    rdb.Subscribe(ctx),
		ctx:       ctx,
		cancel:    cancel,
		listeners: make(map[string]map[chan struct{}]struct{}),
		changed:   make(chan struct{}, 1),
	}
	// go-redis reconnects and subscribes again after a failure, and sends
	// a Subscription then; the hub wakes the channel's listeners, since
	// hints may have been lost meanwhile.
	messages := h.pubsub.ChannelWithSubscriptions(redis.WithChannelSize(64))
	h.wg.Add(2)
	go h.receive(messages)
	go h.track()
	return h
}

// subscribe adds a listener for channel.
func (h *hub) subscribe(channel string) (<-chan struct{}, func()) {
	hints := make(chan struct{}, 1)
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.listeners[channel] == nil {
		h.listeners[channel] = make(map[chan struct{}]struct{})
		h.touch()
	}
	h.listeners[channel][hints] = struct{}{}
	var once sync.Once
	return hints, func() {
		once.Do(func() {
			h.mu.Lock()
			defer h.mu.Unlock()
			delete(h.listeners[channel], hints)
			if len(h.listeners[channel]) == 0 {
				delete(h.listeners, channel)
				h.touch()
			}
		})
	}
}

// touch tells track that the channels changed. h.mu must be held.
func (h *hub) touch() {
	select {
	case h.changed <- struct{}{}:
	default:
	}
}

// receive hands the hints out until the subscription is closed.
func (h *hub) receive(messages <-chan any) {
	defer h.wg.Done()
	for msg := range messages {
		var channel string
		switch msg := msg.(type) {
		case *redis.Message:
			channel = msg.Channel
		case *redis.Subscription:
			if msg.Kind != "subscribe" {
				continue
			}
			channel = msg.Channel
		}
		h.mu.Lock()
		for hints := range h.listeners[channel] {
			select {
			case hints <- struct{}{}:
			default:
			}
		}
		h.mu.Unlock()
	}
}

// track keeps the subscription's channels those that have listeners until
// the hub closes. After a failure it tries again a second later: meanwhile
// the feeds' readers read at their own interval anyway.
func (h *hub) track() {
	defer h.wg.Done()
	subscribed := make(map[string]struct{})
	var retry <-chan time.Time
	for {
		select {
		case <-h.ctx.Done():
			return
		case <-h.changed:
		case <-retry:
		}
		h.mu.Lock()
		var add, remove []string
		for channel := range h.listeners {
			if _, ok := subscribed[channel]; !ok {
				add = append(add, channel)
			}
		}
		for channel := range subscribed {
			if _, ok := h.listeners[channel]; !ok {
				remove = append(remove, channel)
			}
		}
		h.mu.Unlock()

		var err error
		if len(add) > 0 {
			err = h.pubsub.Subscribe(h.ctx, add...)
		}
		if len(remove) > 0 && err == nil {
			err = h.pubsub.Unsubscribe(h.ctx, remove...)
		}
		retry = nil
		if err != nil {
			retry = time.After(time.Second)
			continue
		}
		for _, channel := range add {
			subscribed[channel] = struct{}{}
		}
		for _, channel := range remove {
			delete(subscribed, channel)
		}
	}
}

// close ends the subscription and waits for the hub's goroutines.
func (h *hub) close() {
	h.cancel()
	_ = h.pubsub.Close()
	h.wg.Wait()
}
